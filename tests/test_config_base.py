"""``_base_`` resolves against the YAML file's own folder, else against the shipped configs (any working folder)."""
import os

import pytest

from lakd.config import load_config, load_yaml, shipped_configs_dir
from lakd.errors import LakdError


@pytest.mark.parametrize("base", ["configs/cifar10/_base_distill.yaml", "configs/cifar10/_base_distill",
                                  "cifar10/_base_distill.yaml"])
def test_base_names_a_shipped_config_from_any_folder(tmp_path, monkeypatch, base):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"_base_: {base}\nmethod: kd\nmodel: {{name: resnet8}}\nteacher: {{name: resnet20}}\n")
    monkeypatch.chdir(tmp_path)  # not the clone's root
    cfg = load_config(str(mine))
    shipped = load_yaml(os.path.join(shipped_configs_dir(), "cifar10", "_base_distill.yaml"))
    assert cfg["method"] == "kd" and cfg["model"]["name"] == "resnet8"
    assert cfg["solver"]["epochs"] == shipped["solver"]["epochs"]


def test_base_prefers_the_files_own_folder(tmp_path, monkeypatch):
    (tmp_path / "configs" / "cifar10").mkdir(parents=True)
    (tmp_path / "configs" / "cifar10" / "_base_distill.yaml").write_text("seed: 7\n")
    (tmp_path / "mine.yaml").write_text("_base_: configs/cifar10/_base_distill.yaml\n")
    monkeypatch.chdir(tmp_path)
    assert load_yaml("mine.yaml")["seed"] == 7


def test_base_missing_names_the_file(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: nowhere/nothing.yaml\n")
    with pytest.raises(LakdError, match="nothing.yaml"):
        load_yaml(str(tmp_path / "mine.yaml"))

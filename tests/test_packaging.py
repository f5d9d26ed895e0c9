"""The package as a user meets it: configs shipped and found by name, one version, and a first contact that does
not import torch (``--help``, ``--version``, a missing config, a misspelt key or method)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import lakd
from lakd.cli.main import main
from lakd.config import load_config, run_sections, shipped_config, shipped_config_names, shipped_configs_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_fresh_process(argv: list[str], cwd: str) -> dict:
    """Run ``lakd.cli.main.main(argv)`` in a new interpreter; what it printed, its exit code, whether torch got
    imported."""
    code = ("import json, sys\nfrom lakd.cli.main import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    status = json.loads(p.stderr.strip().splitlines()[-1])
    return {**status, "out": p.stdout, "err": "\n".join(p.stderr.strip().splitlines()[:-1])}


@pytest.mark.parametrize("argv, rc, text", [
    (["--help"], 0, "usage: lakd"),
    (["--version"], 0, f"lakd {lakd.__version__}"),
    (["train", "--help"], 0, "data.train_subset=N"),
    (["train", "no/such/config.yaml"], 2, "does not exist"),
    (["train", "cifar10/kd/resnet56_resnet20x"], 2, "did you mean: cifar10/kd/resnet56_resnet20"),
    (["train", "cifar10/kd/resnet56_resnet20", "solver.lrr=0.1"], 2, "unknown config key 'solver.lrr'"),
    (["train", "cifar10/kd/resnet56_resnet20", "method=lakdd"], 2, "unknown method 'lakdd' (did you mean: lakd"),
    (["train", "cifar10/kd/resnet56_resnet20", "kd.TT=2"], 2, "unknown config key 'kd.TT'"),
    (["train", "cifar10/lakd/resnet56_resnet20_149", "--show-config"], 0, "sdm:"),
    (["methods"], 0, "lakd_joint = sdm.backward=joint"),
    (["configs"], 0, "cifar100/kd/resnet32x4_resnet8x4"),
])
def test_first_contact_imports_no_torch(argv, rc, text, tmp_path):
    got = _in_fresh_process(argv, cwd=str(tmp_path))  # not the clone's root: shipped configs by name
    assert got["rc"] == rc, got
    assert text in got["out"] + got["err"], got
    assert not got["torch"], f"`lakd {' '.join(argv)}` imported torch"
    if rc == 2:
        assert got["err"].startswith("error: ") and len(got["err"].splitlines()) == 1, got["err"]


def test_version_has_one_source():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        declared = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert lakd.__version__ == declared


def test_pyproject_lists_every_package_and_ships_the_configs():
    """The packages are listed by hand in pyproject.toml (so that configs/ can map to lakd.configs): the list must
    name every folder of the package, and the configs' package data every shipped YAML."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    listed = set(re.findall(r'"(lakd(?:\.[a-z_]+)*)"', re.search(r"^packages = \[(.*?)\]", text, re.M | re.S)
                            .group(1)))
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "lakd"))
             if "__init__.py" in files}
    assert listed == found | {"lakd.configs"}
    assert '"lakd.configs" = "configs"' in text and '"lakd.configs" = ["**/*.yaml"]' in text
    assert "distillers/catalog.json" in text
    assert not re.search(r'"torch[^"]*<', text) and not re.search(r'"torchvision[^"]*<', text), "no upper caps"


def test_method_catalog_is_current():
    """catalog.json is what the method classes declare (else: `python -m lakd.distillers.catalog`)."""
    from lakd.distillers import catalog

    with open(catalog.PATH, encoding="utf-8") as f:
        assert f.read() == catalog.render(catalog.build()), "stale: run `python -m lakd.distillers.catalog`"


def test_config_layer_agrees_with_and_without_the_method_classes(monkeypatch):
    """The config layer reads the catalog while the methods are not imported: the same defaults and verdicts."""
    import lakd.config as C
    from lakd.registry import DISTILLERS

    live = C.full_defaults()
    monkeypatch.setattr(DISTILLERS, "_loaded", False)
    assert DISTILLERS.light() is None  # the classes have registered: they are asked, never the catalog
    monkeypatch.setattr(DISTILLERS, "_items", {})
    assert DISTILLERS.light() is not None
    assert C.full_defaults() == live
    assert C.uses_teacher({"method": "kd"}) and not C.uses_teacher({"method": "scratch"})
    assert DISTILLERS.light()["tfkd"]["teacher_depends_on_settings"]  # Tf-KD's mode decides: the class is asked
    monkeypatch.undo()
    assert C.uses_teacher({"method": "tfkd", "tfkd": {"mode": "self"}})
    assert not C.uses_teacher({"method": "tfkd", "tfkd": {"mode": "reg"}})


def test_a_method_registered_at_run_time_is_known_to_the_config_layer():
    from lakd.distillers import DISTILLERS, register_distiller
    from lakd.distillers.kd import KD

    @register_distiller("kd_mine_test")
    class Mine(KD):
        DEFAULTS = {"kd_mine_test": {"w": 1.0}}

    try:
        cfg = load_config(None, ["method=kd_mine_test", "teacher.name=resnet8", "kd_mine_test.w=2"])
        assert cfg["kd_mine_test"] == {"w": 2.0}
    finally:
        DISTILLERS._items.pop("kd_mine_test")
        DISTILLERS._info.pop("kd_mine_test")


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    names = shipped_config_names()
    assert len(names) > 300 and "cifar10/lakd/resnet56_resnet20_149" in names
    assert not any(n.rsplit("/", 1)[-1].startswith("_") for n in names)
    path = shipped_config("cifar10/kd/resnet56_resnet20")
    assert path == os.path.join(shipped_configs_dir(), "cifar10", "kd", "resnet56_resnet20.yaml")
    assert shipped_config("configs/cifar10/kd/resnet56_resnet20.yaml") == path
    assert shipped_config("cifar10/kd/nothing") is None
    monkeypatch.chdir(tmp_path)  # outside the clone: by name, and the clone's configs/... path, both resolve
    a = load_config("cifar10/kd/resnet56_resnet20")
    b = load_config("configs/cifar10/kd/resnet56_resnet20.yaml")
    assert a == b and a["method"] == "kd" and a["experiment"] == "cifar10_kd_resnet56_resnet20"
    mine = tmp_path / "mine.yaml"  # _base_ by name
    mine.write_text("_base_: cifar10/kd/resnet56_resnet20\nsolver: {lr: 0.2}\n")
    c = load_config(str(mine))
    assert c["solver"]["lr"] == 0.2 and c["kd"] == a["kd"]


def test_show_config_prints_the_runs_sections_unless_all(capsys):
    cfg = load_config("configs/cifar10/lakd/resnet56_resnet20_149.yaml")
    own = run_sections(cfg)
    assert {"sdm", "ndam", "solver", "model", "teacher"} <= set(own) and "kd" not in own and "crd" not in own
    assert main(["train", "configs/cifar10/kd/resnet56_resnet20.yaml", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "\nkd:" in out and "\ncrd:" not in out and "\nsdm:" not in out
    assert main(["train", "--show-config", "all", "configs/cifar10/kd/resnet56_resnet20.yaml", "solver.lr=0.3"]) == 0
    out = capsys.readouterr().out
    assert "\ncrd:" in out and "lr: 0.3" in out
    assert main(["train", "--show-config", "configs/cifar10/kd/resnet56_resnet20.yaml", "solver.lr=0.2"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.2" in out and "\ncrd:" not in out


def test_runs_record_the_version(tmp_path, digits_overrides):
    from lakd.engine.trainer import Trainer

    cfg = load_config(None, digits_overrides("kd"))
    summary = Trainer(cfg, quiet=True).fit()
    assert summary["lakd_version"] == lakd.__version__
    with open(os.path.join(summary["run_dir"], "config.yaml"), encoding="utf-8") as f:
        assert f.readline().startswith(f"# lakd {lakd.__version__}, torch ")

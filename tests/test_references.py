"""Reference-recipe configs (configs/<dataset>/<method>/ref/*.yaml) against the committed table of reference values
(configs/_references.yaml): every config resolves (lakd.load_config) to its source's solver and data values and to
its method's settings, and names its source (repository, 40-hex commit, files, reported top-1, deviations), so a
drifting value fails here. Also the ``reference`` entry's validation and ``lakd configs``' recipe column."""
from __future__ import annotations

import copy
import glob
import os
import re

import pytest
import yaml

from lakd.config import config_changes, load_config
from lakd.distillers import DISTILLERS
from lakd.errors import LakdError
from lakd.models import list_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_PATH = os.path.join(ROOT, "configs", "_references.yaml")
REF_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*", "ref", "*.yaml")))
NOT_METHODS = ("teachers",)  # configs/<dataset>/<dir> folders that are not a method's


@pytest.fixture(scope="module")
def table():
    with open(TABLE_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def split_pair(pair: str) -> tuple[str, str]:
    """``wrn_40_2_wrn_16_2`` -> (``wrn_40_2``, ``wrn_16_2``): the one split whose halves are both zoo names."""
    names = set(list_models())
    cuts = [(pair[:i], pair[i + 1:]) for i, c in enumerate(pair) if c == "_"]
    found = [c for c in cuts if c[0] in names and c[1] in names]
    assert len(found) == 1, pair
    return found[0]


def expected(table: dict, dataset: str, method_dir: str, pair: str) -> dict:
    """The effective values of one reference config, as the table's header defines them."""
    entry = table[dataset][method_dir]
    pe = entry["pairs"][pair]
    src = table["sources"][entry["source"]]
    return {
        "method": entry["method"],
        "solver": _merge(_merge(src[dataset]["solver"], entry.get("solver")), pe.get("solver")),
        "data": _merge(_merge(src[dataset].get("data", {}), entry.get("data")), pe.get("data")),
        "settings": _merge(entry["settings"], pe.get("settings")),
        "reference": {"repository": src["repository"], "commit": src["commit"],
                      "files": entry["files"] + pe.get("files", []), "top1": pe["top1"],
                      "reported_in": pe.get("reported_in", entry["reported_in"]),
                      "deviations": entry["deviations"] + pe.get("deviations", [])},
    }


def _where(path: str) -> tuple[str, str, str]:
    rel = os.path.relpath(path, os.path.join(ROOT, "configs")).split(os.sep)
    assert len(rel) == 4 and rel[2] == "ref", rel
    return rel[0], rel[1], os.path.splitext(rel[3])[0]


def test_the_table_and_the_configs_cover_each_other(table):
    assert len(REF_CONFIGS) > 150
    on_disk = {_where(p) for p in REF_CONFIGS}
    in_table = {(ds, d, p) for ds in table if ds != "sources" for d, e in table[ds].items()
                for p in e.get("pairs", {})}
    assert on_disk == in_table
    for ds in [k for k in table if k != "sources"]:
        # every method folder of the dataset says whether its reference has a recipe (pairs) or why not (no_config)
        dirs = {d for d in os.listdir(os.path.join(ROOT, "configs", ds))
                if os.path.isdir(os.path.join(ROOT, "configs", ds, d)) and d not in NOT_METHODS}
        assert dirs <= set(table[ds]), sorted(dirs - set(table[ds]))
        for d, e in table[ds].items():
            assert ("no_config" in e) != ("pairs" in e), (ds, d)
            if "no_config" in e:
                assert isinstance(e["no_config"], str) and len(e["no_config"]) > 20, (ds, d)
                assert not glob.glob(os.path.join(ROOT, "configs", ds, d, "ref", "*.yaml")), (ds, d)
    for name, src in table["sources"].items():
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]), name
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", src["repository"]), name


@pytest.mark.parametrize("path", REF_CONFIGS, ids=lambda p: "/".join(_where(p)))
def test_reference_config_matches_the_table(table, path):
    dataset, method_dir, pair = _where(path)
    want = expected(table, dataset, method_dir, pair)
    cfg = load_config(path)
    assert cfg["method"] == want["method"]
    assert cfg["data"]["dataset"] == dataset
    assert cfg["experiment"] == f"{dataset}_{method_dir}_ref_{pair}"
    names = table[dataset][method_dir]["pairs"][pair]
    # a pair of networks from outside the zoo names them in the table (OFA-KD's timm:swin_tiny... -> timm:resnet18)
    teacher, student = (names["teacher"], names["student"]) if "student" in names else split_pair(pair)
    assert cfg["model"]["name"] == student
    if DISTILLERS.get(cfg["method"]).uses_teacher(cfg):
        assert cfg["teacher"]["name"] == (student if method_dir == "tfkd_self" else teacher)
    for key, value in want["solver"].items():
        assert cfg["solver"][key] == pytest.approx(value), f"solver.{key}"
    for key, value in want["data"].items():
        assert cfg["data"][key] == pytest.approx(value), f"data.{key}"
    # every section of the method, complete: a setting the table does not pin is a failure too
    assert set(want["settings"]) == set(DISTILLERS.get(cfg["method"]).DEFAULTS)
    for section, values in want["settings"].items():
        assert cfg[section] == values, section
    assert cfg["reference"] == want["reference"]
    assert re.fullmatch(r"[0-9a-f]{40}", cfg["reference"]["commit"])


def test_reference_entries_are_validated_with_one_line_errors():
    good = {"repository": "megvii-research/mdistiller", "commit": "a" * 40, "files": ["configs/cifar100/kd.yaml"],
            "top1": 73.33, "reported_in": "README.md", "deviations": []}
    assert load_config(None, ["reference=" + yaml.safe_dump(good, default_flow_style=True).strip()])["reference"] \
        == good
    cases = [({**good, "commit": "a08d46f"}, "40-hex"), ({**good, "repository": "mdistiller"}, "owner/name"),
             ({**good, "top1": 173.3}, "top1"), ({**good, "files": "kd.yaml"}, "reference.files"),
             ({**good, "commt": "x"}, "did you mean: commit"), ({"repository": good["repository"]}, "commit"),
             ("mdistiller", "mapping")]
    for ref, match in cases:
        with pytest.raises(LakdError, match=match) as e:
            load_config(None, ["reference=" + yaml.safe_dump(ref, default_flow_style=True).strip()])
        assert "\n" not in str(e.value)


def test_the_reference_entry_changes_nothing_a_resumed_run_computes():
    a = load_config(os.path.join(ROOT, "configs", "cifar100", "kd", "ref", "resnet32x4_resnet8x4.yaml"))
    b = copy.deepcopy(a)
    b["reference"]["top1"], b["reference"]["deviations"] = 70.0, ["another"]
    assert config_changes(a, b) == {}
    b["reference"] = None
    assert config_changes(a, b) == {}
    b["kd"]["T"] = 2.0
    assert set(config_changes(a, b)) == {"kd.T"}


def test_lakd_configs_shows_each_configs_recipe(capsys):
    from lakd.cli.main import main

    assert main(["configs", "--root", os.path.join(ROOT, "configs")]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith("#"):
            name, label = re.fullmatch(r"(\S+)\s{2,}(\S.*)", line).groups()
            rows[name] = label
    assert rows["cifar100/kd/ref/resnet32x4_resnet8x4"] == "ref: mdistiller@a08d46f"
    assert rows["cifar100/kd/resnet32x4_resnet8x4"] == "paper"
    assert rows["imagenet/kd/resnet34_resnet18"] == "paper"
    assert rows["cifar100/teachers/resnet56"] == "mdistiller"
    assert len(rows) > 400 and all(v == "paper" or v.startswith("ref: ") for k, v in rows.items()
                                   if "/teachers/" not in k and "/scratch/" not in k)


def test_docs_list_every_reference_config_and_deviation(table):
    """docs/methods.md's "Reference configs" section names every reference config folder and says every deviation
    and every reason for a missing config, as the table does."""
    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    for ds in [k for k in table if k != "sources"]:
        for d, e in table[ds].items():
            if "no_config" in e:
                assert " ".join(e["no_config"].split()) in text, (ds, d)
                continue
            assert f"`{d}/ref/`" in text, (ds, d)
            for dev in e["deviations"] + [x for pe in e["pairs"].values() for x in pe.get("deviations", [])]:
                assert " ".join(dev.split()) in text, (ds, d, dev)

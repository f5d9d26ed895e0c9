"""Method settings checked from their declarations (``Distiller.SETTINGS`` / ``CHECKS``, ``lakd.settings``):
NaN and infinity refused for every numeric setting, ranges, cross-setting rules, and the rules that need the
training set; each a one-line error with exit code 2 before anything is built, and nothing left on disk."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import lakd
from lakd import settings
from lakd.cli.main import main
from lakd.config import full_defaults, load_config
from lakd.distillers import DISTILLERS
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _declared():
    """(method, key, default) for every setting of every method's DEFAULTS."""
    out = []
    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        for sec, values in cls.DEFAULTS.items():
            for k, v in values.items():
                out.append((name, f"{sec}.{k}", v))
    return out


# ----- the declarations themselves -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", DISTILLERS.names())
def test_declarations_are_plain_data_and_sound(method):
    cls = DISTILLERS.get(method)
    assert json.loads(json.dumps({"SETTINGS": cls.SETTINGS, "CHECKS": cls.CHECKS})) == \
        {"SETTINGS": cls.SETTINGS, "CHECKS": cls.CHECKS}  # strings, numbers, lists, dicts only
    assert settings.check_declarations(method, cls.DEFAULTS, cls.SETTINGS, cls.CHECKS) == []


@pytest.mark.parametrize("method,key,default", [d for d in _declared() if d[2] is not None])
def test_every_setting_is_declared(method, key, default):
    """Every setting with a value by default has a spec (so none escapes the checks); numbers as numbers."""
    spec = DISTILLERS.get(method).SETTINGS.get(key)
    assert spec is not None, f"{method}: {key} has no SETTINGS entry"
    if _numeric(default):
        assert spec["kind"] in ("number", "int") or (spec["kind"] == "choice" and all(map(_numeric, spec["choices"]))), \
            (key, spec)


NUMERIC = [(m, k) for m, k, v in _declared() if _numeric(v)]


@pytest.mark.parametrize("method,key", NUMERIC)
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_nan_and_infinity_are_refused_for_every_numeric_setting(method, key, bad):
    with pytest.raises(LakdError) as e:
        load_config(None, [f"method={method}", "teacher.name=resnet8", f"{key}={bad}"])
    msg = str(e.value)  # whole-number settings are refused by type first ("override k='.nan': k must be a whole number")
    assert "\n" not in msg and key in msg and ("finite" in msg or "whole number" in msg or "one of" in msg), msg


def test_the_settings_module_imports_no_torch():
    code = "import sys, lakd.settings; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ----- the values and the rules, unit by unit ------------------------------------------------------------------
@pytest.mark.parametrize("spec,good,bad", [
    ({"kind": "number", "gt": 0}, [1e-9, 4, 4.0], [0, -1, math.nan, math.inf, True, "4"]),
    ({"kind": "number", "ge": 0, "le": 1}, [0, 0.5, 1], [-1e-9, 1.01, math.nan]),
    ({"kind": "int", "ge": 1, "odd": True}, [1, 3], [2, 0, 3.0, True]),
    ({"kind": "choice", "choices": [1, 2]}, [1, 2], [3, True, "1"]),
    ({"kind": "ints", "ge": 0, "increasing": True}, [[], [30, 45]], [[45, 30], [30, 30], [-1], [1.5], None]),
    ({"kind": "numbers", "gt": 0, "nonempty": True}, [[4.0, 2]], [[], [0.0], [math.nan], "4"]),
    ({"kind": "int", "ge": 0, "null": True, "also": ["auto"]}, [None, "auto", 0], ["x", -1, True]),
    ({"kind": "text"}, ["classifier", "costs/c100.pt"], ["", "  ", None, 1]),
])
def test_value_specs(spec, good, bad):
    assert all(settings.value_ok(spec, v) for v in good)
    assert not any(settings.value_ok(spec, v) for v in bad)


def test_the_smallest_batch_is_the_batch_or_the_last_partial_one():
    cfg = {"solver": {"batch_size": 64, "max_steps_per_epoch": 0}}
    assert settings.run_facts(cfg, world_size=1)["@smallest_batch"][0] == 64
    assert settings.run_facts(cfg, world_size=4)["@smallest_batch"][0] == 16
    facts = settings.run_facts(cfg, train_size=257, world_size=1)
    assert facts["@smallest_batch"][0] == 1 and facts["@train_size"][0] == 257
    assert facts["@smallest_batch"][2](2) == "solver.batch_size=63 or data.train_subset=256"  # 257 % 63 == 5
    assert settings.run_facts(cfg, train_size=257, world_size=2)["@smallest_batch"][0] == 32  # ranks drop it
    cut = {"solver": {"batch_size": 64, "max_steps_per_epoch": 4}}  # 4 full steps: the partial one never runs
    assert settings.run_facts(cut, train_size=257, world_size=1)["@smallest_batch"][0] == 64


def test_fitting_values_meet_the_rules_of_a_short_run():
    from lakd.distillers import DISTILLERS

    known = {"solver.epochs": 2, "@train_size": 128}
    assert settings.fitting_values(DISTILLERS.get("dkd").CHECKS, known) == {"dkd.warmup": 2}
    assert settings.fitting_values(DISTILLERS.get("crd").CHECKS, known) == {"crd.nce_k": 127}
    assert settings.fitting_values(DISTILLERS.get("kd").CHECKS, known) == {}
    over = ["method=reviewkd", "teacher.name=resnet8", "solver.epochs=2"]
    with pytest.raises(LakdError, match="reviewkd.warmup=20 must be <= solver.epochs=2"):
        load_config(None, over)
    fit = settings.fitting_values(DISTILLERS.get("reviewkd").CHECKS, known)
    assert load_config(None, over + [f"{k}={v}" for k, v in fit.items()])["reviewkd"]["warmup"] == 2


# ----- the cases of issue 34: one line, exit code 2, nothing built or written ----------------------------------
CASES = [
    (["method=kd", "kd.T=.nan"], r"^error: kd.T \(the temperature\) must be a finite number > 0, got nan; e.g. kd.T=4.0$"),
    (["method=kd", "kd.T=.inf"], r"kd.T .* got inf"),
    (["method=kd", "kd.ce_weight=.nan"], r"kd.ce_weight must be a finite number >= 0, got nan"),
    (["method=ctkd", "ctkd.t_start=.nan"], r"ctkd.t_start .* got nan"),
    (["method=ctkd", "ctkd.t_range=.nan"], r"ctkd.t_range .* got nan"),
    (["method=ctkd", "ctkd.lambda_max=.nan"], r"ctkd.lambda_max .* got nan"),
    (["method=pad_l2", "pad_l2.l2_weight=.nan"], r"pad_l2.l2_weight .* got nan"),
    (["method=srd", "srd.feat_weight=.nan"], r"srd.feat_weight .* got nan"),
    (["method=sp", "sp.feat_weight=.inf"], r"sp.feat_weight .* got inf"),
    (["method=vid", "vid.feat_weight=.nan"], r"vid.feat_weight .* got nan"),
    (["method=ab", "ab.margin=.nan"], r"ab.margin .* got nan"),
    (["method=fsp", "fsp.pretrain_lr=.nan"], r"fsp.pretrain_lr .* got nan"),
    (["method=kd", "kd.kd_weight=-1"], r"kd.kd_weight must be a finite number >= 0, got -1.0; e.g. kd.kd_weight=0.9"),
    (["method=nst", "nst.feat_weight=-1"], r"nst.feat_weight must be a finite number >= 0, got -1.0"),
    (["method=rkd", "rkd.distance_weight=-1"], r"rkd.distance_weight must be a finite number >= 0, got -1.0"),
    (["method=reviewkd", "reviewkd.weight=-1"], r"reviewkd.weight must be a finite number >= 0"),
    (["method=dot", "dot.delta=-1"], r"dot.delta .* must be a finite number >= 0"),
    (["method=kd", "kd.ce_weight=0", "kd.kd_weight=0"],
     r"every loss weight of kd is 0 \(kd.ce_weight=0.0, kd.kd_weight=0.0\): the run would train nothing"),
    (["method=lakd", "lakd.ce_weight=0", "lakd.att_weight=0", "lakd.feat_weights=[0,0,0]"],
     r"every loss weight of lakd is 0 .*lakd.feat_weights=\[0,0,0\]"),
    (["method=reviewkd", "reviewkd.warmup=50", "solver.epochs=1"],
     r"reviewkd.warmup=50 must be <= solver.epochs=1 for reviewkd .*; e.g. reviewkd.warmup=1 "
     r"\(or waive=\[reviewkd.warmup\] to run it so on purpose\)$"),
    (["method=dkd", "solver.epochs=3"], r"dkd.warmup=20 must be <= solver.epochs=3 for dkd"),
    (["method=sskd", "solver.batch_size=1"],
     r"the batch \(solver.batch_size=1\) must be >= 2 for sskd .*; e.g. solver.batch_size=64$"),
    (["method=rkd", "solver.batch_size=2"], r"must be >= 3 for rkd"),
    (["method=sskd", "sskd.pretrain_milestones=[45,30]"],
     r"sskd.pretrain_milestones .* increasing, got \[45, 30\]; e.g. sskd.pretrain_milestones=\[30,45\]"),
    (["method=kd", "solver.milestones=[180,150]"], r"solver.milestones must be increasing epochs >= 0"),
    (["method=kd", "solver.gamma=.nan"], r"solver.gamma .* must be a finite number > 0, got nan"),
    (["method=kd", "solver.warmup_epochs=5", "solver.epochs=2"], r"solver.warmup_epochs=5.0 must be <= solver.epochs=2"),
    (["method=kd", "data.mean=[.nan,0.5,0.5]"], r"data.mean must be finite"),
    (["method=vid", "vid.eps=6.0"], r"vid.init_pred_var=5.0 must be > vid.eps=6.0 for vid"),
    (["method=ofd", "ofd.connector_kernel=2"], r"ofd.connector_kernel .* must be an odd whole number >= 1, got 2"),
    (["method=tfkd", "tfkd.mode=x"], r"tfkd.mode .* must be one of reg, self, got 'x'"),
]


@pytest.mark.parametrize("overrides,match", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_settings_are_one_line_and_exit_2(overrides, match, tmp_path, capsys):
    capsys.readouterr()
    code = main(["train", "teacher.name=resnet8", "model.name=resnet8", "data.dataset=digits", "device=cpu",
                 f"output_dir={tmp_path / 'runs'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    import re

    assert re.search(match, err.strip()), err
    assert not (tmp_path / "runs").exists()  # refused before any run folder (or model) exists


@pytest.mark.parametrize("extra,match", [
    (["method=crd", "data.train_subset=256"],
     r"crd.nce_k=16384 must be < the training set's 256 images for crd .*; e.g. crd.nce_k=255$"),
    (["method=srd", "data.train_subset=257", "solver.batch_size=64"],
     r"the epoch's last batch \(257 training images in batches of 64 leave 1\) must be >= 2 for srd .*; e.g. "
     r"solver.batch_size=63 or data.train_subset=256$"),
])
def test_rules_that_need_the_training_set_run_before_any_model(extra, match, tmp_path, capsys, monkeypatch):
    import re

    from lakd.engine import build as build_mod

    def no_models(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(build_mod, "build_models", no_models)
    capsys.readouterr()
    code = main(["train", "teacher.name=resnet8", "model.name=resnet8", "data.dataset=digits", "device=cpu",
                 "solver.epochs=1", "train.progress=false", f"output_dir={tmp_path / 'runs'}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(match, err.strip()), err
    assert not (tmp_path / "runs").exists()


def test_the_library_checks_the_same_declarations():
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    with pytest.raises(LakdError, match=r"^kd.T \(the temperature\) must be a finite number > 0, got nan"):
        lakd.distiller(s, t, "kd", image_size=32, options={"kd": {"T": float("nan")}})
    with pytest.raises(LakdError, match="every loss weight of kd is 0"):
        lakd.distiller(s, t, "kd", image_size=32, options={"kd": {"ce_weight": 0, "kd_weight": 0.0}})
    with pytest.raises(LakdError, match="crd.nce_k=16384 must be < the training set's 100 images"):
        lakd.distiller(s, t, "crd", image_size=32, num_data=100)


def test_settings_of_methods_not_run_are_still_refused_when_nan():
    """A NaN in any method's section is refused (the value can never be meant), but cross-setting rules apply to
    the run's method only: KD's weights at 0 do not stop a LAKD run."""
    with pytest.raises(LakdError, match="kd.T"):
        load_config(None, ["method=lakd", "teacher.name=resnet8", "kd.T=.nan"])
    cfg = load_config(None, ["method=lakd", "teacher.name=resnet8", "kd.ce_weight=0", "kd.kd_weight=0"])
    assert cfg["kd"]["ce_weight"] == 0.0 and full_defaults()["kd"]["ce_weight"] == 0.1


# ----- waiving a rule on purpose ---------------------------------------------------------------------------------
def test_a_waivable_rule_is_refused_with_the_waiver_named_and_passes_when_waived(caplog):
    over = ["method=dkd", "teacher.name=resnet8", "solver.epochs=3"]
    with pytest.raises(LakdError, match=r"e.g. dkd.warmup=3 \(or waive=\[dkd.warmup\] to run it so on purpose\)$"):
        load_config(None, over)
    settings._WAIVED_SAID.clear()
    with caplog.at_level("WARNING", logger="lakd.settings"):
        cfg = load_config(None, over + ["waive=[dkd.warmup]"])
        load_config(None, over + ["waive=[dkd.warmup]"])  # checked again (the engine, the distiller): said once
    assert len([r for r in caplog.records if "waive" in r.getMessage()]) == 1
    assert cfg["dkd"]["warmup"] == 20 and cfg["waive"] == ["dkd.warmup"]
    assert any("dkd.warmup=20 is not <= solver.epochs=3" in r.getMessage() and "waive=[dkd.warmup]" in r.getMessage()
               for r in caplog.records)
    # a rule that would make the run fail (not marked waivable) stays a refusal whatever waive says
    with pytest.raises(LakdError, match=r"^waive=\[crd.nce_k\]: crd has no rule on crd.nce_k that may be waived "
                                        r"\(waivable: none\); remove it from waive$"):
        load_config(None, ["method=crd", "teacher.name=resnet8", "waive=[crd.nce_k]"])
    with pytest.raises(LakdError, match=r"dkd has no rule on kd.T that may be waived \(waivable: dkd.warmup\)"):
        load_config(None, over + ["waive=[kd.T]"])
    with pytest.raises(LakdError, match=r"waive must be a list \(e.g. waive=\[dkd.warmup\]\), got 'dkd.warmup'"):
        load_config(None, over + ["waive=dkd.warmup"])
    with pytest.raises(LakdError, match=r"waive must be a list of setting keys"):
        load_config(None, over + ["waive=[3]"])


def test_only_loss_warmups_are_waivable():
    """Waivable marks a choice (the loss reaches part of its weight), never a run that cannot work."""
    waivable = {r["key"] for m in DISTILLERS.names() for r in DISTILLERS.get(m).CHECKS if r.get("waivable")}
    assert waivable == {"dkd.warmup", "reviewkd.warmup", "sdd.warmup"}


def test_a_hand_built_distiller_reads_the_waiver():
    s, t = create_model("resnet8", 10), create_model("resnet8", 10)
    cfg = full_defaults()
    cfg.update(method="dkd")
    cfg["solver"]["epochs"] = 3
    cls = DISTILLERS.get("dkd")
    with pytest.raises(LakdError, match="dkd.warmup=20 must be <= solver.epochs=3"):
        cls(s, t, cfg)
    cfg["waive"] = ["dkd.warmup"]
    d = cls(s, t, cfg)
    assert d.warmup_factor() == pytest.approx(1 / 20)


def test_the_study_spec_plans_no_refused_run(tmp_path, monkeypatch):
    """The study's reproduction command (`lakd sweep sweeps/cifar10_seeds.yaml` into a fresh results folder) resolves
    every row: a run whose config a later check refuses would stop the sweep before it starts anything."""
    from lakd.sweep import load_plan

    monkeypatch.setenv("LAKD_SHARED", str(tmp_path))
    plan = load_plan(str(ROOT / "sweeps" / "cifar10_seeds.yaml"), runs_dir=str(tmp_path / "runs"),
                     results_dir=str(tmp_path / "res"))
    assert plan.runs and [r.name for r in plan.runs if r.refused] == []

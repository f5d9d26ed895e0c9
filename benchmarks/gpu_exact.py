"""Every method on one device: it trains, repeats bitwise with ``train.deterministic=true``, and resumes exactly.

The CPU test suite proves these for CPU runs (``tests/test_engine.py``); a CUDA device adds nondeterministic
kernels (atomics in scatter/index_add and some backward passes), cuBLAS workspaces and device-placement bugs
that a CPU never shows. For each method and AMP mode this trains a tiny run (digits, resnet8 student and a
random resnet8 teacher, 2 epochs of 3 steps) three ways in one process: twice uninterrupted, and once as one
epoch, a checkpoint, and a resume from it. It reports whether the two uninterrupted runs agree bitwise
(``repeat``) and whether the resumed one agrees with them (``resume``), with the largest absolute difference
of any parameter or buffer when they do not, and which nondeterministic operations PyTorch warned about.

Usage: ``python benchmarks/gpu_exact.py --device cuda [--methods all] [--amp none,bf16] [--json FILE]``
(on a CPU it runs too, as a check of the script: every row should be bitwise there).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lakd.config import load_config  # noqa: E402
from lakd.distillers import DISTILLERS, method_variants, resolve_method  # noqa: E402
from lakd.engine.checkpoint import atomic_save  # noqa: E402
from lakd.engine.trainer import Trainer  # noqa: E402
from lakd.models import create_model  # noqa: E402
from lakd.settings import fitting_values  # noqa: E402

TINY = ["data.dataset=digits", "data.train_subset=128", "data.test_subset=120", "solver.batch_size=32",
        "solver.lr=0.05", "solver.schedule=linear", "model.name=resnet8", "teacher.name=resnet8",
        "train.progress=false", "data.num_workers=0", "solver.epochs=2", "solver.max_steps_per_epoch=3",
        "train.deterministic=true"]


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in trainer.distiller.state_dict().items()}


def _diff(a: dict, b: dict) -> tuple[bool, float]:
    if a.keys() != b.keys():
        return False, float("inf")
    worst, same = 0.0, True
    for k in a:
        if not torch.equal(a[k], b[k]):
            same = False
            if a[k].is_floating_point():
                worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
            else:
                worst = float("inf")
    return same, worst


def check(method: str, amp: str, device: str, teacher: Path, out: Path) -> dict:
    name, extra = resolve_method(method)
    # a method's settings that must fit the run (a warm-up within its 2 epochs, CRD's negatives within 128 images)
    fit = fitting_values(DISTILLERS.get(name).CHECKS, {"solver.epochs": 2, "@train_size": 128})
    common = [*TINY, f"method={name}", *extra, *(f"{k}={v}" for k, v in fit.items()),
              f"teacher.checkpoint={teacher}", f"device={device}",
              f"train.amp={amp}", f"output_dir={out}"]
    t0 = time.perf_counter()
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = Trainer(load_config(None, common + [f"experiment={method}-{amp}-a"]), quiet=True)
        a.fit()
        b = Trainer(load_config(None, common + [f"experiment={method}-{amp}-b"]), quiet=True)
        b.fit()
        part = Trainer(load_config(None, common + [f"experiment={method}-{amp}-p"]), quiet=True)
        part.train_epoch(0)  # one epoch, then the checkpoint fit() writes, then a resume from it
        atomic_save(part._checkpoint(1), str(out / f"{method}-{amp}-p" / "last.pt"))
        part.close()
        r = Trainer(load_config(None, common + [f"experiment={method}-{amp}-p", f"resume={out}/{method}-{amp}-p"]),
                    quiet=True)
        assert r.start_epoch == 1
        r.fit()
        caught = sorted({str(x.message).split("\n")[0][:160] for x in w
                         if "deterministic" in str(x.message).lower()})
    sa, sb, sr = _state(a), _state(b), _state(r)
    rep, rep_d = _diff(sa, sb)
    res, res_d = _diff(sa, sr)
    return {"method": method, "amp": amp, "repeat_bitwise": rep, "repeat_max_abs": rep_d,
            "resume_bitwise": res, "resume_max_abs": res_d, "nondeterministic_warnings": caught,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default="all", help="comma-separated methods/variants, or all")
    p.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16, fp16")
    p.add_argument("--json", default=None, help="write the rows to this file as well")
    args = p.parse_args()
    methods = list(method_variants()) if args.methods == "all" else args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        teacher = out / "teacher.pt"
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10}, teacher)
        for amp in args.amp.split(","):
            for m in methods:
                try:
                    row = check(m, amp, args.device, teacher, out)
                except Exception as e:  # report and go on: one broken method must not hide the others
                    row = {"method": m, "amp": amp, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                rows.append(row)
                if "error" in row:
                    print(f"{m:15s} {amp:5s} ERROR {row['error']}", flush=True)
                else:
                    print(f"{m:15s} {amp:5s} repeat {'bitwise' if row['repeat_bitwise'] else row['repeat_max_abs']!s:>9}"
                          f"  resume {'bitwise' if row['resume_bitwise'] else row['resume_max_abs']!s:>9}"
                          f"  {row['seconds']:5.1f} s  {'; '.join(row['nondeterministic_warnings'])}", flush=True)
    env = {"device": args.device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    bad = [r for r in rows if "error" in r or not (r["repeat_bitwise"] and r["resume_bitwise"])]
    print(f"{len(rows) - len(bad)} of {len(rows)} method/amp rows repeat and resume bitwise")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""``lakd demo``: what distillation is for, offline on scikit-learn's bundled digits, in minutes on a CPU.

A resnet20 teacher learns from all 1437 labelled training images. Three resnet8 students then get only a few
of those labels (``--labelled``, 150 by default) and a short budget: one from scratch, one with KD, one with
LAKD. With so few labels the teacher's knowledge is what the distilled students have over the scratch one, and
the table shows it: top-1 of each, EK (of the test images the teacher gets wrong, the share the student gets
right, with the counts, since the teacher errs on few images), and each method's training-step memory against
scratch (``lakd bench memory`` on the same models). Everything lands under one folder.
"""
from __future__ import annotations

import argparse
import json
import os
import time

HELP = "distillation on the bundled digits: a teacher, then scratch/KD/LAKD students with few labels (offline)"

#: LAKD's weights for this small pair (its CAT-KD term weighted 1.0, NDAM's max term 2.0)
LAKD_DEMO = ["lakd.att_weight=1.0", "ndam.avg=1.0", "ndam.max=2.0"]
STAGES = [
    # name, method, model, extra overrides
    ("teacher", "scratch", "teacher", []),
    ("scratch", "scratch", "student", []),
    ("kd", "kd", "student", []),
    ("lakd", "lakd", "student", LAKD_DEMO),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the runs (one sub-folder per model) and demo.md")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--labelled", type=int, default=150,
                   help="labelled training images the students get (of 1437; the teacher sees all)")
    p.add_argument("--epochs", type=int, default=20, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")


def _memory_ratios(args, device: str) -> dict:
    """Training-step memory of each student method against scratch (the bench's own measurement)."""
    from ..analysis.cost import measure_memory

    methods = [m for _, m, who, _ in STAGES if who == "student"]
    out = measure_memory(args.teacher, args.student, methods, batch_size=64, num_classes=10, device=device,
                         overrides=LAKD_DEMO)
    return {"measure": out["measure"], **{m: r["ratio_to_scratch"] for m, r in out["results"].items()}}


def run(args) -> int:
    from ..config import load_config
    from ..distillers import DISTILLERS
    from ..engine import rundir
    from ..engine.trainer import Trainer
    from ..errors import LakdError
    from ..runtime.device import resolve_device

    if args.labelled < 10 or args.epochs < 1 or args.teacher_epochs < 1:
        raise LakdError("--labelled must be at least 10 and --epochs/--teacher-epochs at least 1")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    common = [
        "data.dataset=digits", f"device={args.device}", f"seed={args.seed}", "solver.batch_size=64",
        "solver.lr=0.1", "solver.schedule=cosine", "solver.weight_decay=5e-4", "train.progress=false",
        "train.eval_batch_size=512",
    ]
    rows, teacher_ckpt = [], None
    for name, method, who, extra in STAGES:
        over = common + [f"method={method}", f"experiment={name}"]
        if who == "teacher":
            over += [f"model.name={args.teacher}", f"solver.epochs={args.teacher_epochs}"]
        else:
            over += [f"model.name={args.student}", f"solver.epochs={args.epochs}",
                     f"data.train_subset={args.labelled}"]
            if DISTILLERS.get(method).needs_teacher:
                over += [f"teacher.name={args.teacher}", f"teacher.checkpoint={teacher_ckpt}"]
        cfg = load_config(None, over + extra + list(args.overrides))
        run_dir = os.path.join(args.out, name)
        print(f"== {name}: {method} {cfg['model']['name']} on {cfg['data']['train_subset'] or 'all'} labelled "
              f"images for {cfg['solver']['epochs']} epochs", flush=True)
        trainer = Trainer(cfg, run_dir=run_dir, overwrite=True)  # replaces the demo's own earlier run
        summary = trainer.fit()
        if who == "teacher":
            teacher_ckpt = os.path.join(run_dir, rundir.BEST)
        row = {"run": name, "method": method, "model": cfg["model"]["name"], "labelled": trainer.data.num_train,
               "epochs": cfg["solver"]["epochs"], "top1": summary["final_top1"], "best_top1": summary["best_top1"],
               "ek": summary["final_ek"], "wall_time_s": summary["wall_time_s"]}
        if summary["final_ek"] is not None:  # EK's counts: k of the n test images the teacher gets wrong
            n = round((100.0 - summary["teacher_top1"]) * trainer.data.num_test / 100.0)
            row["ek_of"] = [round(summary["final_ek"] * n / 100.0), n]
        rows.append(row)
    device = str(resolve_device(args.device))
    memory = _memory_ratios(args, device)
    for r in rows:
        r["memory_vs_scratch"] = memory.get(r["method"]) if r["run"] != "teacher" else None
    total = time.perf_counter() - t_start
    lines = ["| run | method | model | labelled images | epochs | top-1 (final) | top-1 (best) | EK | "
             "step memory vs scratch | time (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ek = "" if r["ek"] is None else f"{r['ek']:.1f} ({r['ek_of'][0]}/{r['ek_of'][1]})"
        mem = "" if r["memory_vs_scratch"] is None else f"{r['memory_vs_scratch']:.2f}"
        lines.append(f"| {r['run']} | {r['method']} | {r['model']} | {r['labelled']} | {r['epochs']} | "
                     f"{r['top1']:.2f} | {r['best_top1']:.2f} | {ek} | {mem} | {r['wall_time_s']:.1f} |")
    table = "\n".join(lines)
    students = [r for r in rows if r["memory_vs_scratch"] is not None]  # the first one learns without a teacher
    scratch = students[0]
    gains = ", ".join(f"{r['run']} {r['top1'] - scratch['top1']:+.1f}" for r in students[1:])
    note = (f"The students saw {scratch['labelled']} labelled images, the teacher all of them; top-1 over the "
            f"scratch student: {gains} points. EK: of the test images the teacher gets wrong (n), the share "
            f"(and count k/n) the student gets right. Memory: {memory['measure']}, one training step at "
            f"batch 64, against scratch.")
    print("\n" + table + "\n\n" + note + f"\n\ndemo finished in {total:.1f} s; runs under {args.out}")
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(f"# lakd demo (sklearn digits, 32x32)\n\n{table}\n\n{note}\n\nTotal wall time: {total:.1f} s\n")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"rows": rows, "memory_measure": memory["measure"], "wall_time_s": total}, f, indent=2)
    return 0

"""``lakd eval --checkpoint PATH [--teacher PATH] [key=value ...]``: top-1, top-5, loss and EK."""
from __future__ import annotations

import argparse
import json

from .common import add_progress_flag, progress_on, progress_overrides

HELP = "evaluate a checkpoint on a test set: top-1, top-5, loss, and EK against a teacher"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("example:\n  lakd eval --checkpoint runs/cifar10_lakd_149/best.pt "
                "--teacher runs/cifar10_teacher_resnet56/best.pt data.root=/data")
    p.add_argument("--checkpoint", required=True, help="student checkpoint (lakd, mdistiller or RepDistiller)")
    p.add_argument("--arch", help="model name when the checkpoint does not record it (mdistiller files)")
    p.add_argument("--teacher", help="teacher checkpoint: also report its accuracy and the student's EK")
    p.add_argument("--teacher-arch", help="teacher model name when its checkpoint does not record it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_flag(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.dataset, data.root, device, ...)")


def run(args) -> int:
    from ..engine.loading import load_models_and_data
    from ..engine.metrics import evaluate
    from ..runtime.progress import tracked

    paths = [args.checkpoint] + ([args.teacher] if args.teacher else [])
    archs = [args.arch] + ([args.teacher_arch] if args.teacher else [])
    models, _labels, _metas, data, cfg, device = load_models_and_data(paths, archs,
                                                                      progress_overrides(args, args.overrides))
    model = models[0]
    on = progress_on(cfg)
    out: dict = {"checkpoint": args.checkpoint, "dataset": cfg["data"]["dataset"]}
    teacher_correct = None
    if args.teacher:
        tres = evaluate(models[1], tracked(data.test, "eval teacher", on), device)
        teacher_correct = tres["correct"]
        out.update(teacher_top1=tres["top1"], teacher_top5=tres["top5"])
    res = evaluate(model, tracked(data.test, "eval student" if args.teacher else "eval", on), device,
                   teacher_correct=teacher_correct)
    out.update(top1=res["top1"], top5=res["top5"], loss=res["loss"], ek=res["ek"], num_images=res["num_images"])
    total = data.num_test_total
    if total and total != out["num_images"]:  # data.test_subset: the numbers are over part of the test set
        out["test_images_total"] = total
    if args.json:
        print(json.dumps(out))
    else:
        of = f"{out['num_images']} images of {out['dataset']}" + (
            f": data.test_subset, of {out['test_images_total']} test images" if "test_images_total" in out else "")
        print(f"{args.checkpoint}: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  loss {out['loss']:.4f}  "
              f"({of})")
        if args.teacher:
            print(f"teacher {args.teacher}: top-1 {out['teacher_top1']:.2f}  top-5 {out['teacher_top5']:.2f}")
            ek = "n/a (the teacher is never wrong)" if out["ek"] is None else f"{out['ek']:.2f}%"
            print(f"EK (student right where the teacher is wrong): {ek}")
    return 0

"""``lakd eval --checkpoint PATH [--teacher PATH] [key=value ...]``: top-1, top-5, loss and EK."""
from __future__ import annotations

import argparse
import json

HELP = "evaluate a checkpoint on a test set: top-1, top-5, loss, and EK against a teacher"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("example:\n  lakd eval --checkpoint runs/lakd/best.pt --teacher ../shared/teachers/cifar10_resnet56.pth "
                "data.root=../shared/data")
    p.add_argument("--checkpoint", required=True, help="student checkpoint (lakd, mdistiller or RepDistiller)")
    p.add_argument("--arch", help="model name when the checkpoint does not record it (mdistiller files)")
    p.add_argument("--teacher", help="teacher checkpoint: also report its accuracy and the student's EK")
    p.add_argument("--teacher-arch", help="teacher model name when its checkpoint does not record it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (data.dataset, data.root, device, ...)")


def load_any(path: str, arch: str | None, num_classes: int | None):
    """A model from a lakd checkpoint (arch recorded) or any known layout given ``arch``."""
    from ..errors import LakdError
    from ..models import create_model, load_model_from_checkpoint, read_checkpoint

    obj = read_checkpoint(path)
    if obj.get("arch") and not arch:
        return load_model_from_checkpoint(path)
    if not arch:
        raise LakdError(f"{path!r} does not record its architecture: pass --arch/--teacher-arch (e.g. resnet56)")
    n = obj.get("num_classes") or num_classes
    model = create_model(arch, int(n), checkpoint=path)
    return model.eval(), obj


def check_classes(model, path, data) -> None:
    from ..errors import LakdError

    n = model.classifier.out_features
    if n != data.num_classes:
        raise LakdError(f"{path!r} predicts {n} classes but {data.dataset} has {data.num_classes}; evaluate it on "
                        f"its own dataset (data.dataset=..., data.root=...)")


def run(args) -> int:
    from ..config import load_config
    from ..data import build_data
    from ..engine.device import resolve_device
    from ..engine.metrics import evaluate
    from ..models import read_checkpoint

    ck = read_checkpoint(args.checkpoint)
    base = []
    if ck.get("dataset"):
        base.append(f"data.dataset={ck['dataset']}")
    if ck.get("config", {}).get("data", {}).get("root"):
        base.append(f"data.root={ck['config']['data']['root']}")
    cfg = load_config(None, base + list(args.overrides))
    if cfg["data"]["mean"] is None and ck.get("mean"):
        cfg["data"]["mean"], cfg["data"]["std"] = list(ck["mean"]), list(ck["std"])
    device = resolve_device(str(cfg["device"]))
    data = build_data(cfg, device)
    model, _ = load_any(args.checkpoint, args.arch, data.num_classes)
    check_classes(model, args.checkpoint, data)
    model.to(device)
    out: dict = {"checkpoint": args.checkpoint, "dataset": cfg["data"]["dataset"]}
    teacher_correct = None
    if args.teacher:
        teacher, _ = load_any(args.teacher, args.teacher_arch, data.num_classes)
        check_classes(teacher, args.teacher, data)
        tres = evaluate(teacher.to(device), data.test, device)
        teacher_correct = tres["correct"]
        out.update(teacher_top1=tres["top1"], teacher_top5=tres["top5"])
    res = evaluate(model, data.test, device, teacher_correct=teacher_correct)
    out.update(top1=res["top1"], top5=res["top5"], loss=res["loss"], ek=res["ek"], num_images=res["num_images"])
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.checkpoint}: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  loss {out['loss']:.4f}  "
              f"({out['num_images']} images of {out['dataset']})")
        if args.teacher:
            print(f"teacher {args.teacher}: top-1 {out['teacher_top1']:.2f}  top-5 {out['teacher_top5']:.2f}")
            ek = "n/a (the teacher is never wrong)" if out["ek"] is None else f"{out['ek']:.2f}%"
            print(f"EK (student right where the teacher is wrong): {ek}")
    return 0

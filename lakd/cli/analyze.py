"""``lakd analyze cka``: linear CKA between a teacher's and its students' layers (the paper's Figure 1).

Also holds the checkpoint-and-data loading that ``lakd visualize`` shares.
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch

from ..errors import LakdError

HELP = "analyses of trained models: linear CKA between teacher and student layers (Figure 1)"

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

CKA_EPILOG = """\
examples:
  lakd analyze cka --teacher teachers/resnet56.pth --teacher-arch resnet56 \\
      --students runs/kd_r20/best.pt runs/lakd_r20/best.pt data.dataset=cifar100
  lakd analyze cka --teacher t.pt --students s.pt --student-points blocks --batch-size 256 --images 5000

The full estimator (default) keeps every image's features and uses n x n Gram matrices; --batch-size B uses
the minibatch estimator with the unbiased HSIC (Nguyen et al. 2021), for many images or big feature maps.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    sub.required = True
    p = sub.add_parser("cka", help="linear CKA between every teacher stage and every student stage",
                       description="Linear CKA (Kornblith et al. 2019) between the teacher's and each student's "
                                   "stage (or block) outputs on test images; writes cka.json and figures.",
                       epilog=CKA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint")
    p.add_argument("--students", nargs="+", required=True, metavar="CKPT", help="student checkpoints")
    p.add_argument("--teacher-arch", default=None, metavar="NAME",
                   help="teacher model name, for checkpoints that do not record it (mdistiller's)")
    p.add_argument("--student-arch", nargs="+", default=None, metavar="NAME",
                   help="student model name(s) for checkpoints that do not record it: one for all or one each")
    p.add_argument("--images", type=int, default=1000, help="number of test images (default 1000)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="minibatch CKA with this many images per minibatch (default 0: full estimator)")
    p.add_argument("--teacher-points", default="stages",
                   help="teacher representations: stages (default), blocks or block indices like 3,6,9")
    p.add_argument("--student-points", default="stages",
                   help="student representations: stages (default), blocks (every block: the outputs of "
                        "LAKD's possible local modules), local (the local modules' ends recorded in each "
                        "student's config, sdm.splits; stages where none) or block indices like 1,4,9")
    p.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="memory for the full estimator's features; more passes over the data above it")
    p.add_argument("--out", default="cka", metavar="DIR", help="output folder (default ./cka)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for the data, e.g. data.dataset=cifar100 data.root=../shared/data")
    p.set_defaults(_analysis=run_cka_command)


def run(args) -> int:
    return int(args._analysis(args) or 0)


# ----------------------------------------------------------------------------------------------------
# Shared by `lakd analyze` and `lakd visualize`
# ----------------------------------------------------------------------------------------------------


def split_overrides(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items swallowed by a ``nargs='+'`` option go back to the overrides."""
    paths, extra = [], []
    for it in items:
        if _OVERRIDE.match(it) and not os.path.exists(it):
            extra.append(it)
        else:
            paths.append(it)
    return paths, extra + list(overrides or [])


def resolve_device(name: str) -> torch.device:
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LakdError(f"device={name} asked for but no CUDA GPU is available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LakdError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def model_label(path: str, meta: dict) -> str:
    """The run's experiment name recorded in the checkpoint, else the file name (with its folder for
    last.pt/best.pt)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if cfg.get("experiment"):
        return str(cfg["experiment"])
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ("best", "last", "checkpoint", "model"):
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{parent}/{stem}" if parent else stem
    return stem


def unique_labels(labels: list[str], paths: list[str]) -> list[str]:
    """Labels made distinct: repeated ones get their file name, then a counter."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    out = []
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1 and stems[i] != lab:
            lab = f"{lab} ({stems[i]})"
        base, k = lab, 2
        while lab in out:
            lab = f"{base} #{k}"
            k += 1
        out.append(lab)
    return out


def _user_sets(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def load_models_and_data(paths: list[str], archs: list[str | None], overrides: list[str],
                         test_images: int | None = None):
    """Read checkpoints, build the test data (dataset and normalisation from the checkpoints unless
    overridden) and the models on the configured device.

    Returns ``(models, labels, metas, bundle, cfg, device)``; models are in eval mode; labels (see
    ``model_label``) may repeat.
    """
    from ..config import load_config
    from ..models import create_model, read_checkpoint

    metas = [read_checkpoint(p) for p in paths]
    for p, m, a in zip(paths, metas, archs):
        if not a and not m.get("arch"):
            raise LakdError(f"checkpoint {p!r} does not record its architecture; give the model name "
                            f"(e.g. --teacher-arch resnet56 / --student-arch resnet20 / --arch resnet20)")
    auto: list[str] = []
    datasets = {str(m["dataset"]).lower() for m in metas if m.get("dataset")}
    forced = [o.split("=", 1)[1].strip().lower() for o in overrides if o.split("=", 1)[0].strip() == "data.dataset"]
    if not forced:
        if len(datasets) > 1:
            raise LakdError(f"the checkpoints were trained on different datasets ({', '.join(sorted(datasets))}); "
                            f"compare models of one dataset, or force one with data.dataset=NAME")
        if datasets:
            auto.append(f"data.dataset={next(iter(datasets))}")
    # the normalisation recorded in the checkpoints, when they were trained on the dataset used here
    same = [m for m in metas if not forced or str(m.get("dataset") or "").lower() == forced[-1]]
    for key in ("mean", "std"):
        vals = [m[key] for m in same if m.get(key) is not None]
        if vals and not _user_sets(overrides, f"data.{key}"):
            auto.append(f"data.{key}={json.dumps([float(v) for v in vals[0]])}")
    sizes = [((m.get("config") or {}).get("data") or {}).get("image_size") for m in metas
             if isinstance(m.get("config"), dict)]
    sizes = [s for s in sizes if s]
    if sizes and not _user_sets(overrides, "data.image_size"):
        auto.append(f"data.image_size={int(sizes[0])}")
    if test_images and not _user_sets(overrides, "data.test_subset"):
        auto.append(f"data.test_subset={int(test_images)}")
    cfg = load_config(None, auto + list(overrides))
    device = resolve_device(cfg.get("device", "auto"))
    threads = int((cfg.get("train") or {}).get("threads") or 0)
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)

    from ..data import build_data

    bundle = build_data(cfg, device)
    models = []
    for p, m, a in zip(paths, metas, archs):
        arch = a or str(m["arch"])
        nc = int(m.get("num_classes") or bundle.num_classes)
        if nc != bundle.num_classes:
            raise LakdError(f"checkpoint {p!r} has {nc} classes but dataset {cfg['data']['dataset']!r} has "
                            f"{bundle.num_classes}; set data.dataset to the dataset it was trained on")
        model = create_model(arch, nc, checkpoint=p)
        models.append(model.to(device).eval())
    labels = [model_label(p, m) for p, m in zip(paths, metas)]
    return models, labels, metas, bundle, cfg, device


def _archs(arg, n: int, flag: str) -> list[str | None]:
    if not arg:
        return [None] * n
    if len(arg) == 1:
        return list(arg) * n
    if len(arg) != n:
        raise LakdError(f"{flag} takes one model name for all checkpoints or one per checkpoint ({n}), "
                        f"got {len(arg)}")
    return list(arg)


def local_points(meta: dict) -> str:
    """The ends of a LAKD student's local modules (``sdm.splits`` in its run config) as a point spec."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    splits = (cfg.get("sdm") or {}).get("splits") if cfg.get("method") == "lakd" else None
    return ",".join(str(int(s)) for s in splits) if splits else "stages"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


# ----------------------------------------------------------------------------------------------------
# lakd analyze cka
# ----------------------------------------------------------------------------------------------------


def run_cka_command(args) -> int:
    from ..analysis.cka import run_cka
    from ..analysis.visualize import plot_cka_diagonal, plot_cka_heatmap

    students, overrides = split_overrides(args.students, args.overrides)
    if not students:
        raise LakdError("--students needs at least one checkpoint")
    if args.images < 4:
        raise LakdError(f"--images {args.images}: CKA needs at least 4 images")
    if args.batch_size < 0 or 0 < args.batch_size < 4:
        raise LakdError(f"--batch-size {args.batch_size}: use 0 (full estimator) or at least 4")
    paths = [args.teacher] + students
    archs = _archs([args.teacher_arch] if args.teacher_arch else None, 1, "--teacher-arch") + \
        _archs(args.student_arch, len(students), "--student-arch")
    models, labels, metas, bundle, cfg, device = load_models_and_data(paths, archs, overrides, args.images)
    teacher, t_label = models[0], labels[0]
    s_labels = unique_labels(labels[1:], students)
    pairs = list(zip(s_labels, models[1:]))
    s_points = [local_points(m) for m in metas[1:]] if args.student_points == "local" else args.student_points
    result = run_cka(teacher, pairs, bundle.test, num_images=args.images, batch_size=args.batch_size,
                     teacher_points=args.teacher_points, student_points=s_points,
                     image_size=int(bundle.image_size), max_memory_gb=args.max_memory_gb)
    os.makedirs(args.out, exist_ok=True)
    data = result.to_dict()
    data.update({
        "dataset": cfg["data"]["dataset"],
        "teacher": {"label": t_label, "checkpoint": args.teacher, "arch": archs[0] or metas[0].get("arch"),
                    "points": result.teacher_points, "top1": data["teacher_top1"]},
    })
    for s, p, a, m in zip(data["students"], students, archs[1:], metas[1:]):
        s["checkpoint"] = p
        s["arch"] = a or m.get("arch")
    data.pop("teacher_top1")
    figures = []
    for s in data["students"]:
        path = os.path.join(args.out, f"cka_{_safe(s['label'])}.png")
        title = (f"linear CKA, {result.estimator} estimator, {result.num_images} {cfg['data']['dataset']} "
                 f"test images\nteacher {t_label} ({data['teacher']['arch']}) vs student {s['label']} "
                 f"({s['arch']})")
        plot_cka_heatmap(s["matrix"], result.teacher_points, s["points"], path, title=title,
                         row_title=f"teacher {t_label}", col_title=f"student {s['label']}")
        s["figure"] = path
        figures.append(path)
    diag_path = os.path.join(args.out, "cka_stages.png")
    plot_cka_diagonal(data["students"], diag_path,
                      title=f"CKA with teacher {t_label} stage by stage ({result.num_images} test images)")
    figures.append(diag_path)
    data["diagonal_figure"] = diag_path
    json_path = os.path.join(args.out, "cka.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"linear CKA ({result.estimator} estimator) on {result.num_images} test images; teacher {t_label} "
          f"top-1 {data['teacher']['top1']:.2f}%")
    for s in data["students"]:
        diag = ", ".join("n/a" if v is None else f"{v:.3f}" for v in s["diagonal"])
        print(f"  {s['label']}: top-1 {s['top1']:.2f}%, stage-by-stage CKA [{diag}]")
    print(f"wrote {json_path} and {len(figures)} figure(s) in {args.out}")
    return 0

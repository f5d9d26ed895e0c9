"""``lakd analyze cka``: linear CKA between a teacher's and its students' layers (the paper's Figure 1).

Checkpoints and data are loaded by ``lakd.engine.loading`` (shared with ``lakd eval`` and ``lakd visualize``).
"""
from __future__ import annotations

import argparse
import json
import os
import re

from ..errors import LakdError
from .common import (
    add_progress_flag,
    archs_for,
    check_out_dir,
    default_out_dir,
    progress_on,
    progress_overrides,
    split_overrides,
)

HELP = "analyses of trained models: linear CKA between teacher and student layers (Figure 1)"

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
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: cka/ in the first student's run folder, the folder of its "
                        "checkpoint when lakd train wrote it; else ./lakd-cka/)")
    add_progress_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for the data, e.g. data.dataset=cifar100 data.root=/data")
    p.set_defaults(_analysis=run_cka_command)


def run(args) -> int:
    return int(args._analysis(args) or 0)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


# ----------------------------------------------------------------------------------------------------
# lakd analyze cka
# ----------------------------------------------------------------------------------------------------


def run_cka_command(args) -> int:
    from ..analysis.cka import run_cka
    from ..analysis.visualize import plot_cka_diagonal, plot_cka_heatmap
    from ..distillers import analysis_points
    from ..engine.loading import load_models_and_data, unique_labels

    students, overrides = split_overrides(args.students, args.overrides)
    if args.student_arch:  # `--student-arch resnet20 data.root=...`: the key=value items are overrides
        args.student_arch, overrides = split_overrides(args.student_arch, overrides)
    if not students:
        raise LakdError("--students needs at least one checkpoint")
    if args.images < 4:
        raise LakdError(f"--images {args.images}: CKA needs at least 4 images")
    if args.batch_size < 0 or 0 < args.batch_size < 4:
        raise LakdError(f"--batch-size {args.batch_size}: use 0 (full estimator) or at least 4")
    if not args.out:
        args.out = default_out_dir(students[0], "cka")
    check_out_dir(args.out)
    paths = [args.teacher] + students
    archs = archs_for([args.teacher_arch] if args.teacher_arch else None, 1, "--teacher-arch") + \
        archs_for(args.student_arch, len(students), "--student-arch")
    models, labels, metas, bundle, cfg, device = load_models_and_data(paths, archs,
                                                                      progress_overrides(args, overrides), args.images)
    teacher, t_label = models[0], labels[0]
    s_labels = unique_labels(labels[1:], students)
    pairs = list(zip(s_labels, models[1:]))
    s_points = ([analysis_points(m.get("config") or {}) for m in metas[1:]] if args.student_points == "local"
                else args.student_points)
    from ..runtime.progress import tracked

    images = tracked(bundle.test, f"CKA: {len(models)} models over the test images", progress_on(cfg))
    result = run_cka(teacher, pairs, images, num_images=args.images, batch_size=args.batch_size,
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
    print(f"wrote {json_path} and {len(figures)} figure(s) in {args.out}:")
    for path in figures:
        print(f"  {path}")
    return 0

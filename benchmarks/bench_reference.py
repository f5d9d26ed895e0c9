"""lakd's training path against the field's reference training loop, side by side in one process.

The reference is our own re-implementation of how the peers (mdistiller and the repositories built on it) train
a CIFAR student: a ``torchvision.datasets.CIFAR10``-shaped Dataset (one PIL image per sample, RandomCrop 32 with
padding 4, RandomHorizontalFlip, ToTensor, Normalize), a ``DataLoader`` with 2 workers and shuffling, and a plain
loop: student forward, teacher forward under ``no_grad``, the method's loss, ``zero_grad``, one ``backward``,
``step``; fp32, default memory format. torchvision's own ``CIFAR10`` class checks the archive's md5 sums (the
shared copy's differ), so the Dataset here reads the same pickles and returns the same things.

The lakd side is ``lakd train``'s own path: the ``Trainer`` built from the method's config
(``configs/cifar10/<method>/...``) with every default as a user gets it, timed through ``Trainer.train_epoch``
over ``--steps`` batches (``data.train_subset``), so its data path (the in-memory fast path), memory format,
allocator settings, teacher-first passes and metric bookkeeping are all included.

Both run in this process, in interleaved rounds (lakd, reference, lakd, reference ...); each side's best round
is kept and the spread over rounds is reported. Losses per method (the same definitions on both sides):
scratch CE; KD 0.1 CE + 0.9 KL(T=4); CAT-KD CE + 0.7 CAM loss; LAKD [3,6,9] with NDAM and the CAM loss
(the reference runs LAKD as a plain loop would: every teacher target first, one joint backward). The reference's
models are built with ``train.fold_teacher_bn=false`` (its teacher keeps its BatchNorms, as the peers' do).

A third timing per round runs the reference loop on one prefetched batch: the same loop without its data loading.
Its rate over the reference's (``data_ceiling``) is what removing the data cost alone gives; beyond it a loop must
run the models' own kernels faster (the lakd side's folded teacher BatchNorms).

Usage::

    python benchmarks/bench_reference.py [--methods scratch,kd,catkd,lakd] [--batch-size 64] [--steps 20]
        [--rounds 3] [--root ../shared/data] [--teacher-ckpt ../shared/teachers/cifar10_resnet56.pth] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pil_cifar import TorchvisionCIFAR  # noqa: E402  (benchmarks/)

from lakd.config import load_config  # noqa: E402
from lakd.data.cifar import read_pickle  # noqa: E402
from lakd.distillers.kd import kd_loss  # noqa: E402
from lakd.distillers.losses import class_activation_maps, class_attention_loss  # noqa: E402
from lakd.engine.trainer import Trainer  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CONFIGS = {"scratch": "configs/cifar10/scratch/resnet20.yaml", "kd": "configs/cifar10/kd/resnet56_resnet20.yaml",
           "catkd": "configs/cifar10/catkd/resnet56_resnet20.yaml",
           "lakd": "configs/cifar10/lakd/resnet56_resnet20_369.yaml"}


class PickleCIFAR10(TorchvisionCIFAR):
    """What ``torchvision.datasets.CIFAR10(train=True)`` holds and returns: HWC uint8 images from the pickles,
    one PIL image per ``__getitem__`` through the transform."""

    def __init__(self, root: str, transform):
        folder = os.path.join(root, "cifar-10-batches-py")
        data, targets = [], []
        for i in range(1, 6):
            entry = read_pickle(os.path.join(folder, f"data_batch_{i}"))
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            targets.extend(int(t) for t in entry["labels"])
        super().__init__(np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), targets, transform)


def reference_loader(root: str, batch: int, workers: int) -> DataLoader:
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return DataLoader(PickleCIFAR10(root, tf), batch_size=batch, shuffle=True, num_workers=workers,
                      drop_last=True)


class ReferenceLoop:
    """The plain loop (module docstring) for one method, on the models and loss settings of ``trainer``."""

    def __init__(self, method: str, trainer: Trainer, loader: DataLoader):
        d = trainer.distiller
        self.method = method
        self.student = copy.deepcopy(d.student).to(memory_format=torch.contiguous_format)
        self.teacher = copy.deepcopy(d.teacher).to(memory_format=torch.contiguous_format) if d.teacher else None
        self.lakd = copy.deepcopy(d).to(memory_format=torch.contiguous_format) if method == "lakd" else None
        if self.lakd is not None:
            self.student, self.teacher = self.lakd.student, self.lakd.teacher
        params = (self.lakd.trainable_parameters() if self.lakd is not None else list(self.student.parameters()))
        s = trainer.cfg["solver"]
        self.opt = torch.optim.SGD(params, lr=0.01, momentum=float(s["momentum"]), nesterov=True,
                                   weight_decay=float(s["weight_decay"]))
        self.cfg = trainer.cfg
        self.loader = loader
        self.it = iter(loader)
        self.device = trainer.device

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def loss(self, image, target):
        m, cfg = self.method, self.cfg
        if m == "lakd":  # every teacher target first, then the modules with one joint backward
            t_feats, t_cam = self.lakd.teacher_targets(image)
            _, losses = self.lakd.module_losses(image, target, t_feats, t_cam)
            return sum(losses.values())
        if m == "scratch":
            return F.cross_entropy(self.student(image), target)
        logits, feats = self.student(image, features=True)  # the student first, as the peers' distillers do
        with torch.no_grad():
            t_logits, t_feats = self.teacher(image, features=True)
        if m == "kd":
            k = cfg["kd"]
            return k["ce_weight"] * F.cross_entropy(logits, target) + k["kd_weight"] * kd_loss(logits, t_logits,
                                                                                              k["T"])
        if m == "catkd":
            c = cfg["catkd"]
            cam_s = class_activation_maps(feats["last"], self.student.classifier)
            with torch.no_grad():
                cam_t = class_activation_maps(t_feats["last"], self.teacher.classifier)
            return (c["ce_weight"] * F.cross_entropy(logits, target)
                    + c["beta"] * class_attention_loss(cam_s, cam_t, c["resolution"], c["normalize"]))
        raise ValueError(f"no reference loop for {m}")

    def run(self, steps: int, fixed: bool = False) -> None:
        """``steps`` training steps; ``fixed``: all on one batch fetched before (the loop without its data
        loading: the same kernels, so what any loop on these models could reach)."""
        self.student.train()
        batch = self.next_batch() if fixed else None
        for _ in range(steps):
            image, target = batch if fixed else self.next_batch()
            image, target = image.to(self.device), target.to(self.device)
            loss = self.loss(image, target)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


def lakd_trainer(method: str, root: str, teacher_ckpt: str, batch: int, steps: int, out: str,
                 overrides: list[str]) -> Trainer:
    over = [f"data.root={root}", f"solver.batch_size={batch}", f"data.train_subset={batch * steps}",
            f"output_dir={out}", "solver.epochs=1000", "train.progress=false", "train.save_every=1000",
            "train.eval_every=1000", "data.test_subset=256", *overrides]  # evaluation is not timed
    if method != "scratch":
        over.append(f"teacher.checkpoint={teacher_ckpt}")
    cfg = load_config(str(REPO / CONFIGS[method]), over)
    return Trainer(cfg, quiet=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="scratch,kd,catkd,lakd")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept, spread reported)")
    p.add_argument("--workers", type=int, default=2, help="the reference DataLoader's workers")
    p.add_argument("--root", default=str(REPO / ".." / "shared" / "data"))
    p.add_argument("--teacher-ckpt", default=str(REPO / ".." / "shared" / "teachers" / "cifar10_resnet56.pth"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="config overrides for the lakd side, e.g. train.channels_last=false")
    args = p.parse_args(argv)
    root, ckpt = os.path.abspath(args.root), os.path.abspath(args.teacher_ckpt)
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            tr = lakd_trainer(method, root, ckpt, args.batch_size, args.steps, out, args.overrides)
            # the reference's models as the peers have them: the teacher with its BatchNorms (not folded)
            plain = lakd_trainer(method, root, ckpt, args.batch_size, args.steps, out,
                                 [*args.overrides, "train.fold_teacher_bn=false"])
            ref = ReferenceLoop(method, plain, reference_loader(root, args.batch_size, args.workers))
            del plain
            tr.train_epoch(0)  # warm-up both sides (the reference's workers start here)
            ref.run(3)
            lakd_rates, ref_rates, compute_rates = [], [], []
            for r in range(max(args.rounds, 1)):
                t0 = time.perf_counter()
                tr.train_epoch(r + 1)
                lakd_rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                ref.run(args.steps)
                ref_rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                ref.run(args.steps, fixed=True)
                compute_rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
            ratios = [a / b for a, b in zip(lakd_rates, ref_rates)]
            results[method] = {"lakd_images_per_s": max(lakd_rates), "reference_images_per_s": max(ref_rates),
                               "ratio": max(lakd_rates) / max(ref_rates),
                               "ratio_per_round": ratios, "ratio_spread": max(ratios) - min(ratios),
                               # the reference on one prefetched batch: its loop without the data loading
                               "reference_compute_images_per_s": max(compute_rates),
                               "data_ceiling": max(compute_rates) / max(ref_rates)}
            del ref, tr
    info = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "workers": args.workers,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()), "torch": torch.__version__, "results": results}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"lakd train vs the reference loop (DataLoader, {args.workers} workers), resnet56 -> resnet20, CIFAR-10, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds of "
          f"{args.steps} steps; load average {info['load_average'][0]:.1f}")
    print(f"{'method':<9} {'lakd img/s':>11} {'reference img/s':>16} {'ratio':>7} {'per round':>22} "
          f"{'reference, no data loading':>27}")
    for m, r in results.items():
        rounds = " ".join(f"{x:.2f}" for x in r["ratio_per_round"])
        print(f"{m:<9} {r['lakd_images_per_s']:>11.0f} {r['reference_images_per_s']:>16.0f} {r['ratio']:>6.2f}x "
              f"{rounds:>22} {r['reference_compute_images_per_s']:>13.0f} ({r['data_ceiling']:.2f}x)")
    print(f"(median ratio over methods {statistics.median(r['ratio'] for r in results.values()):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Distil your own student from your own teacher in your own training loop, with plain PyTorch.

Everything here is the user's: the two networks, the Dataset, the optimizer and the loop. ``lakd`` only
provides the distiller (LAKD here; any method of ``lakd methods`` works the same way) and its training step.

    python examples/distil_own_loop.py                       # LAKD, a few hundred steps on CPU
    python examples/distil_own_loop.py --method kd --steps 50
    python examples/distil_own_loop.py --amp bf16            # mixed precision (fp16 uses a GradScaler)

The data set is synthetic (coloured oriented stripes, 4 classes) so the script runs anywhere without
downloads; swap in your own ``Dataset``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import lakd


# ----- your networks --------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class MyNet(nn.Module):
    """A small ResNet-like network: stem, three stages, pooling, a linear classifier."""

    def __init__(self, width=16, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = Block(width, width, 1)
        self.stage2 = Block(width, 2 * width, 2)
        self.stage3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----- your data ---------------------------------------------------------------------------------------------
class Stripes(Dataset):
    """Noisy stripes in one of four orientations (the class), random colour and phase."""

    def __init__(self, n, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        images = []
        for c in self.labels.tolist():
            angle = c * math.pi / 4
            freq = 0.5 + 0.3 * torch.rand(1, generator=g).item()
            phase = 2 * math.pi * torch.rand(1, generator=g).item()
            wave = torch.sin(freq * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
            colour = torch.rand(3, 1, 1, generator=g) + 0.2
            images.append(colour * wave + 0.5 * torch.randn(3, size, size, generator=g))
        self.images = torch.stack(images)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i  # the index: CRD's memory bank keys on it


def accuracy(model, loader):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y, _ in loader:
            right += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return right / total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="lakd",
                   help="distillation method, any name `lakd methods` lists (kd, fitnet, catkd, lakd, ...)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the student's distillation")
    p.add_argument("--teacher-steps", type=int, default=300,
                   help="optimizer steps to train the teacher from scratch first (stands in for loading yours)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, for the teacher and the student")
    p.add_argument("--train-size", type=int, default=2048, help="synthetic training images")
    p.add_argument("--test-size", type=int, default=512, help="synthetic test images for the accuracies printed")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast precision of the distillation steps (fp16 adds a GradScaler)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = DataLoader(Stripes(args.train_size), batch_size=args.batch_size, shuffle=True, drop_last=True)
    test = DataLoader(Stripes(args.test_size, seed=1), batch_size=256)

    # 1. your teacher (normally already trained: load its weights instead)
    teacher = MyNet(width=32).to(device)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    step = 0
    while step < args.teacher_steps:
        for x, y, _ in train:
            loss = F.cross_entropy(teacher(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == args.teacher_steps:
                break

    # 2. the distiller: your student and teacher objects, a method, its options
    student = MyNet(width=16)
    d = lakd.distiller(student, teacher, args.method, image_size=32, num_data=len(train.dataset),
                       student_options={"blocks": ["stage1", "stage2", "stage3"]},
                       teacher_options={"blocks": ["stage1", "stage2", "stage3"]}).to(device)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device, enabled=args.amp == "fp16")

    # 3. your loop: the distiller's step runs the forward passes and calls `backward` (once per local module
    #    for LAKD); then your optimizer steps
    step, losses = 0, {}
    while step < args.steps:
        for x, y, idx in train:
            batch = {"image": x.to(device), "target": y.to(device), "index": idx.to(device)}
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                _, losses = d.train_step(batch, backward=lambda loss: scaler.scale(loss).backward())
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if step == args.steps:
                break

    # 4. `student` is your own module, trained in place: save or use it as usual
    out = {"teacher_acc": accuracy(teacher.cpu(), test), "student_acc": accuracy(student.cpu(), test),
           "losses": {k: float(v) for k, v in losses.items()}}
    print(f"teacher {out['teacher_acc']:.3f}  student ({args.method}) {out['student_acc']:.3f}  last losses "
          + " ".join(f"{k}={v:.3f}" for k, v in out["losses"].items()))
    return out


if __name__ == "__main__":
    main()

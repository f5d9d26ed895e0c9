"""Which torchvision / timm classifiers the adapter takes: for each, adapt with the default cut points, compare the
adapted logits with the plain network's, and build LAKD on the model paired with itself (CAMs included).

    python benchmarks/adapter_survey.py --image-size 64 > survey.md

Prints one markdown row per model: blocks, stage ends, equal logits, LAKD ok, or the one-line error.
"""
from __future__ import annotations

import argparse
import time

import torch

from lakd.config import load_config
from lakd.distillers import build_distiller
from lakd.errors import LakdError
from lakd.models import adapt
from lakd.models.external import build_network

TORCHVISION = ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny", "densenet121",
               "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_0", "vgg11_bn", "googlenet", "inception_v3",
               "vit_b_16", "swin_t", "maxvit_t"]
TIMM = ["resnet18", "resnet34", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002",
        "rexnet_100", "ghostnet_100", "levit_128s", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
        "efficientvit_b0", "fastvit_t8", "repvgg_a0"]


def try_one(name: str, size: int) -> str:
    t0 = time.perf_counter()
    try:
        net = build_network(name, 10)
        net.eval()
        m = adapt(net, input_size=size, name=name)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            same = torch.allclose(m.eval()(x), net(x), atol=1e-5)
        cfg = load_config(None, ["method=lakd", f"model.name={name}", f"teacher.name={name}"])
        d = build_distiller(cfg, m, adapt(build_network(name, 10), input_size=size, name=name))
        d.train()
        _, losses = d.forward_train(x, torch.tensor([0, 1]))
        ok = all(torch.isfinite(v) for v in losses.values())
        return (f"| {name} | {m.num_blocks} | {m.stage_ends} | {'yes' if same else 'NO'} | "
                f"{'yes' if ok else 'non-finite'} | {time.perf_counter() - t0:.1f}s |")
    except LakdError as e:
        return f"| {name} | - | - | - | error: {e} | |"
    except Exception as e:  # a failure the adapter does not turn into a one-line error yet: report it as such
        return f"| {name} | - | - | - | UNHANDLED {type(e).__name__}: {str(e).splitlines()[0][:150]} | |"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--models", default=None, help="comma-separated names (default: the lists above)")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else \
        [f"torchvision:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]
    print(f"| model ({args.image_size} px) | blocks | stage ends | logits equal | LAKD builds and runs | time |")
    print("|---|---|---|---|---|---|")
    for n in names:
        print(try_one(n, args.image_size), flush=True)


if __name__ == "__main__":
    main()

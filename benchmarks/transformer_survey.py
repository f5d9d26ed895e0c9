"""Every method on transformer families and mixed CNN/ViT pairs: does it train, refuse in one line, or fail?

Small members of timm's transformer and transformer-era families, shrunk through their constructor options (depth,
width, image size) so that a step takes a fraction of a second on a CPU, random weights: ViT (class token and
average pooling), DeiT, DeiT distilled, Swin, ConvNeXt, EfficientFormer, EfficientFormerV2, MobileViT, PoolFormer
(each as student and teacher of its own kind), and mixed pairs (a CNN student from a ViT / Swin teacher, a ViT
student from a CNN teacher, the issue's DeiT-Tiny <- ViT-Small). For each pair and every registered method (and
LAKD with ``lakd.att_weight=0``, its setting for class-token networks): build ``lakd.distiller`` (its
construction-time checks included: needs, reachability), one training step on a random batch of 2 (with random
stand-ins for the extra views a method declares, as ``tests/test_imagenet_configs.py`` feeds them).

A cell is ``works`` (finite losses), ``refuses`` (a one-line ``LakdError``: its message) or ``fails`` (anything
else: an exception, a multi-line error, a non-finite loss). Writes ``OUT/survey.json`` and ``OUT/survey.md``:

    nice -n 10 python benchmarks/transformer_survey.py --out results/transformer_survey
    python benchmarks/transformer_survey.py --pairs vit,resnet18<-vit --methods kd,lakd --out $OUT
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

#: timm networks shrunk by constructor options, at the image size they take: name -> (timm name, kwargs, size)
NETS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4), 32),
    "vit_avg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4, global_pool="avg"), 32),
    "vit_small": ("vit_small_patch16_224", dict(img_size=32, patch_size=4, depth=4), 32),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=4), 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=4, depth=4), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(1, 1, 2, 1), embed_dim=32,
                                                  num_heads=(1, 2, 4, 8)), 32),
    "convnext": ("convnext_atto", {}, 32),
    "efficientformer": ("efficientformer_l1", {}, 224),  # its attention biases are fixed at 7 x 7: 224 px only
    "efficientformerv2": ("efficientformerv2_s0", dict(img_size=64), 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "poolformer": ("poolformer_s12", {}, 32),
    "resnet18": ("torchvision:resnet18", {}, 32),
}
#: student <- teacher: each family of its own kind, then the mixed pairs
PAIRS = ([(n, n) for n in NETS if n not in ("vit_small", "resnet18")]
         + [("deit", "vit_small"), ("resnet18", "vit"), ("resnet18", "vit_avg"), ("resnet18", "swin"),
            ("vit", "resnet18"), ("vit_avg", "resnet18"), ("deit_distilled", "resnet18"), ("vit", "convnext"),
            ("mobilevit", "vit_avg")])
STATUSES = ("works", "refuses", "fails")
#: LAKD without its class-attention loss: what a class-token network takes (the refusal names it)
EXTRA = {"lakd[att_weight=0]": ("lakd", {"lakd": {"att_weight": 0}})}


def build(name: str, seed: int, size: int | None = None):
    """The network and its image size; ``size``: at that size instead (a ViT's ``img_size`` set to it)."""
    import timm
    import torch
    import torchvision

    torch.manual_seed(seed)
    net, kw, native = NETS[name]
    kw = dict(kw, **({"img_size": size} if size and "img_size" in kw else {}))
    if net.startswith("torchvision:"):
        return getattr(torchvision.models, net.split(":", 1)[1])(num_classes=10), size or native
    return timm.create_model(net, pretrained=False, num_classes=10, **kw), size or native


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def survey_pair(student: str, teacher: str, methods: list[str]) -> list[dict]:
    import torch

    import lakd
    from lakd.errors import LakdError

    torch.set_num_threads(1)
    s_net, size = build(student, 0)
    t_net, _ = build(teacher, 1, size)  # the teacher at the student's image size
    rows = []
    t0 = time.perf_counter()
    try:
        s0 = lakd.adapt(s_net, input_size=size, name=student)
        t_ad = lakd.adapt(t_net, input_size=size, name=teacher)
    except LakdError as e:
        return [{"student": student, "teacher": teacher, "method": m, "status": "refuses",
                 "message": f"adapter: {first_line(e)}"} for m in methods]
    adapt_s = round(time.perf_counter() - t0, 1)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(2, 3, size, size, generator=g), "target": torch.tensor([0, 1]),
             "index": torch.arange(2)}
    for m in methods:
        method, options = EXTRA.get(m, (m, None))
        options = copy.deepcopy(options) or {}
        if method == "crd":
            options["crd"] = {"nce_k": 4}
        row = {"student": student, "teacher": teacher, "method": m, "status": "fails", "message": ""}
        t1 = time.perf_counter()
        try:
            d = lakd.distiller(copy.deepcopy(s0), copy.deepcopy(t_ad), method, image_size=size, num_data=8,
                               options=options or None)
            d.train()
            opt = d.build_optimizer(d.trainable_parameters(), {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0})
            views = d.random_views(batch["image"])  # the extra views a method declares (SSKD's), as data gives them
            _, losses = d.train_step({**batch, **({"views": views} if views else {})},
                                     lambda loss, **kw: loss.backward(**kw))
            if opt is not None:
                opt.step()
            finite = all(bool(torch.isfinite(v)) for v in losses.values())
            row.update(status="works" if finite else "fails", message="" if finite else "non-finite loss",
                       losses=sorted(losses))
        except LakdError as e:
            one = "\n" not in str(e).strip()
            row.update(status="refuses" if one else "fails", message=first_line(e))
        except Exception as e:  # not turned into a one-line error: reported as a failure
            row.update(status="fails", message=f"{type(e).__name__}: {first_line(e)}")
        row["seconds"] = round(time.perf_counter() - t1, 2)
        rows.append(row)
        print(f"{student} <- {teacher} {m}: {row['status']} {row['message'][:160]}", flush=True)
    rows.append({"student": student, "teacher": teacher, "method": "(adapt)", "status": "info",
                 "message": f"adapted both in {adapt_s} s at {size} px"})
    return rows


def render(rows: list[dict], methods: list[str]) -> str:
    cells = [r for r in rows if r["status"] in STATUSES]
    counts = {s: sum(r["status"] == s for r in cells) for s in STATUSES}
    pairs = list(dict.fromkeys((r["student"], r["teacher"]) for r in cells))
    out = [f"{len(pairs)} pairs x {len(methods)} methods = {len(cells)} runs: "
           + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
    out.append("| student <- teacher | " + " | ".join(f"`{m}`" for m in methods) + " |")
    out.append("|---|" + "---|" * len(methods))
    mark = {"works": "ok", "refuses": "R", "fails": "**F**"}
    for s, t in pairs:
        by = {r["method"]: r for r in cells if (r["student"], r["teacher"]) == (s, t)}
        out.append(f"| {s} <- {t} | " + " | ".join(mark.get(by[m]["status"], "") if m in by else "" for m in methods)
                   + " |")
    out += ["", "Refusals and failures, with their first line:", ""]
    for r in cells:
        if r["status"] != "works":
            out.append(f"- {r['student']} <- {r['teacher']}, `{r['method']}` ({r['status']}): "
                       f"{r['message'].replace('|', '/')}")
    return "\n".join(out) + "\n"


def main(argv=None):
    from lakd.distillers import DISTILLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=None, help="comma-separated 'student<-teacher' (or one name: itself as both); "
                                                 "default: every pair above")
    p.add_argument("--methods", default=None, help="comma-separated; default every registered method and "
                                                   + ", ".join(EXTRA))
    p.add_argument("--out", default=None, help="folder for survey.json and survey.md")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else [*DISTILLERS.names(), *EXTRA]
    pairs = PAIRS
    if args.pairs:
        pairs = [tuple(x.split("<-")) if "<-" in x else (x, x) for x in args.pairs.split(",")]
    rows: list[dict] = []
    for s, t in pairs:
        rows += survey_pair(s, t, methods)
        if args.out:  # written after every pair: an interrupted survey keeps what it has
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "survey.json"), "w") as f:
                json.dump({"methods": methods, "pairs": [list(x) for x in pairs], "nets": {
                    k: [v[0], {a: list(b) if isinstance(b, tuple) else b for a, b in v[1].items()}, v[2]]
                    for k, v in NETS.items()}, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, "survey.md"), "w") as f:
                f.write(render(rows, methods))
    print(render(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())

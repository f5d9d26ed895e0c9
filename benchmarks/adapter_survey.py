"""Which torchvision / timm classifiers the adapter takes, each with random weights at a tiny input.

For every classification constructor of torchvision (``torchvision.models.list_models(module=torchvision.models)``)
and a list of timm families, at the smallest of ``--sizes`` the
network accepts, batch 2:

- builds: the network adapted with its default cut points, its logits equal to the plain network's;
- KD one step and LAKD one step (the same architecture as teacher), finite losses;
- every parameter reached: after each method's one backward, the student parameters without a gradient;
- state-dict round trip: the trained student's state dict loads into a fresh plain network, same logits.

Each model runs under a timeout (in this process by default, ``--isolate``: a child process each).

A row is ``works``, ``refuses`` (a one-line ``LakdError``: its message) or ``fails`` (anything else, or a
parameter that no loss reached). Writes ``OUT/survey.json`` and ``OUT/survey.md``:

    nice -n 10 python benchmarks/adapter_survey.py --out results/adapter_survey
    python benchmarks/adapter_survey.py --models torchvision:resnet18,timm:vit_tiny_patch16_224 --out /tmp/s
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

#: timm families (one small member each): ResNet, ResNet-D, ResNet-T, EfficientNet, MobileNetV3, RegNet, ConvNeXt,
#: DenseNet, ViT, DeiT (and distilled), Swin, MaxViT, CoAtNet, EfficientFormer (and V2), MobileViT, PoolFormer (and V2)
TIMM = ["resnet18", "resnet18d", "resnet10t", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002",
        "convnext_atto", "densenet121", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
        "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224",
        "coatnet_nano_rw_224", "efficientformer_l1", "efficientformerv2_s0", "mobilevit_xxs", "poolformer_s12",
        "poolformerv2_s12"]
STATUSES = ("works", "refuses", "fails")


def all_names() -> list[str]:
    import torchvision

    tv = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return tv + [f"timm:{n}" for n in TIMM]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def survey_one(name: str, sizes: list[int], max_params: float) -> dict:
    """One network's row (runs in the child process)."""
    import copy

    import torch

    import lakd
    from lakd.errors import LakdError
    from lakd.models import adapt
    from lakd.models.external import build_network

    torch.manual_seed(0)
    torch.set_num_threads(1)
    row: dict = {"model": name, "status": "fails", "message": "", "size": None, "params_m": None}
    t0 = time.perf_counter()
    try:
        net = build_network(name, 10)
        row["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
        if row["params_m"] > max_params:
            row.update(status="not run", message=f"{row['params_m']}M parameters, over --max-params {max_params}M")
            return row
        adapted, problem = None, None
        for size in sizes:  # the smallest input it accepts
            try:
                adapted = adapt(copy.deepcopy(net), input_size=size, name=name)
                row["size"] = size
                break
            except LakdError as e:
                problem = e
                if "fails on a" not in str(e):  # not a size problem: the refusal stands
                    break
        if adapted is None:
            raise problem
        size = row["size"]
        g = torch.Generator().manual_seed(1)
        batch = {"image": torch.randn(2, 3, size, size, generator=g), "target": torch.tensor([0, 1]),
                 "index": torch.arange(2)}
        net.eval()
        adapted.eval()
        with torch.no_grad():
            row["logits_equal"] = bool(torch.allclose(adapted(batch["image"]), net(batch["image"]), atol=1e-4))
        row["blocks"] = adapted.num_blocks
        for method in ("kd", "lakd"):
            student = adapt(copy.deepcopy(net), input_size=size, name=name)
            teacher = adapt(copy.deepcopy(net), input_size=size, name=name)
            try:
                d = lakd.distiller(student, teacher, method, image_size=size)
            except LakdError as e:
                row[method] = f"refuses: {_first_line(e)}"
                continue
            d.train()
            _, losses = d.train_step(batch, lambda loss: loss.backward())
            finite = all(bool(torch.isfinite(v)) for v in losses.values())
            unreached = [n for n, p in d.student.named_parameters() if p.requires_grad and p.grad is None]
            row[method] = "ok" if finite and not unreached else ("non-finite loss" if not finite else "unreached")
            row[f"{method}_unreached"] = unreached[:8] + ([f"... {len(unreached)} in all"] if len(unreached) > 8
                                                          else [])
            if method == "kd":  # state-dict round trip of the trained student
                plain = build_network(name, 10)
                plain.load_state_dict(d.student.state_dict(), strict=True)
                plain.eval()
                d.student.eval()
                with torch.no_grad():
                    row["state_dict_round_trip"] = bool(torch.allclose(plain(batch["image"]),
                                                                       d.student(batch["image"]), atol=1e-4))
        checks = [row["logits_equal"], row.get("state_dict_round_trip", False), row["kd"] == "ok"]
        lakd_ok = row["lakd"] == "ok" or row["lakd"].startswith("refuses")
        row["status"] = "works" if all(checks) and lakd_ok else "fails"
        if row["status"] == "fails":
            row["message"] = ", ".join(f"{k}={row.get(k)}" for k in ("logits_equal", "state_dict_round_trip", "kd",
                                                                       "lakd") if row.get(k) not in (True, "ok"))
        elif row["lakd"].startswith("refuses"):
            row["message"] = f"LAKD {row['lakd']}"
    except LakdError as e:
        row.update(status="refuses", message=_first_line(e))
    except Exception as e:  # a failure the adapter does not turn into a one-line error: reported as such
        row.update(status="fails", message=f"{type(e).__name__}: {_first_line(e)}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_child(name: str, sizes: list[int], max_params: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--sizes", ",".join(map(str, sizes)),
           "--max-params", str(max_params)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "not run", "message": f"over the {timeout:.0f} s per-model timeout"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"model": name, "status": "fails", "message": f"process exit {out.returncode}: {err}"}
    return json.loads(lines[-1])


class _Timeout(BaseException):  # not an Exception: survey_one's handlers must not catch it
    pass


def run_here(name: str, sizes: list[int], max_params: float, timeout: float) -> dict:
    """``survey_one`` in this process (no interpreter start per model), stopped by SIGALRM after ``timeout``."""
    import gc
    import signal

    def alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        return survey_one(name, sizes, max_params)
    except _Timeout:
        return {"model": name, "status": "not run", "message": f"over the {timeout:.0f} s per-model timeout"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        gc.collect()


def render(rows: list[dict], sizes: list[int]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in (*STATUSES, "not run")}
    lines = [f"{len(rows)} networks: " + ", ".join(f"{v} {k}" for k, v in counts.items()), "",
             "| model | status | input | params (M) | blocks | KD | LAKD | state dict | message |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        rt = r.get("state_dict_round_trip")
        lines.append(f"| {r['model']} | {r['status']} | {r.get('size') or ''} | {r.get('params_m') or ''} | "
                     f"{r.get('blocks', '')} | {r.get('kd', '')} | {r.get('lakd', '')[:60]} | "
                     f"{'' if rt is None else 'same logits' if rt else 'DIFFERS'} | "
                     f"{r.get('message', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated names (default: every torchvision classifier "
                                                  "and the timm families above)")
    p.add_argument("--sizes", default="32,64,128,224", help="input sizes tried, smallest first")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    p.add_argument("--max-params", type=float, default=100.0, help="skip networks over this many million "
                                                                    "parameters (reported as not run)")
    p.add_argument("--out", default=None, help="folder for survey.json and survey.md (default: print only)")
    p.add_argument("--isolate", action="store_true", help="one child process per model (a crash or a leak stays "
                                                           "there; slower: an interpreter start each)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one model, a JSON line
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:
        print(json.dumps(survey_one(args.one, sizes, args.max_params)), flush=True)
        return 0
    names = args.models.split(",") if args.models else all_names()
    rows = []
    for n in names:
        run = run_child if args.isolate else run_here
        rows.append(run(n, sizes, args.max_params, args.timeout))
        r = rows[-1]
        print(f"{r['model']}: {r['status']} {r.get('message', '')}", flush=True)
        if args.out:  # written after every model: an interrupted survey keeps what it has
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "survey.json"), "w") as f:
                json.dump({"sizes": sizes, "max_params_m": args.max_params, "timeout_s": args.timeout,
                           "planned": names, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, "survey.md"), "w") as f:
                f.write(render(rows, sizes))
    print(render(rows, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What is alive at the peak of one training step on CUDA, per method: the allocator's own event history.

`lakd bench memory` gives the peak of a step on CUDA (``max_memory_allocated``), but not what fills it. On an
H200 every method without LAKD's local backward peaked at the same bytes, although they save different amounts
for backward, and LAKD [3,6,9] peaked 5% above scratch where the CPU allocator says 23% below
(docs/performance.md, "On one GPU"). This script records the CUDA caching allocator's history
(``torch.cuda.memory._record_memory_history``) over one step after two warm-up steps, the same step as
``lakd bench memory``, and reports:

- the peak of the allocations made during the step (the running sum of alloc and free events), which should
  match ``bench memory``'s figure;
- where in the step the peak falls: the Python stack of the allocation that reached it (forward or backward,
  which module);
- the blocks alive at that moment, grouped by the innermost ``lakd`` (else innermost) Python frame that allocated
  them, largest first.

Usage: ``python benchmarks/gpu_memory_peak.py --methods scratch,lakd [--batch-size 64] [--json FILE]`` (needs
CUDA; ``analyze`` works on any snapshot and is tested on a CPU with a synthetic one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _site(frames: list[dict]) -> str:
    """The innermost frame in lakd's own code (else the innermost frame): ``file:line function``."""
    if not frames:
        return "(no Python frame: autograd's backward thread, or C++)"
    own = [f for f in frames if "/lakd/" in f.get("filename", "") or f.get("filename", "").startswith("lakd/")]
    f = (own or frames)[0]
    name = f.get("filename", "?")
    short = name[name.index("lakd/"):] if "lakd/" in name else Path(name).name
    return f"{short}:{f.get('line', '?')} {f.get('name', '?')}"


def analyze(snapshot: dict, device: int = 0, top: int = 12) -> dict:
    """The peak of a recorded window and what is alive at it, from ``torch.cuda.memory._snapshot()``.

    Only blocks allocated inside the window count (frees of older blocks are ignored), as in ``bench memory``,
    which subtracts what was allocated before the step. An allocation is alive from its ``alloc`` event until
    its ``free_completed`` (or ``free_requested`` when the history has no completion for it)."""
    trace = snapshot["device_traces"][device]
    completes = {e["addr"] for e in trace if e["action"] == "free_completed"}
    live: dict[int, dict] = {}
    cur = peak = 0
    peak_live: dict[int, dict] = {}
    peak_event = None
    for e in trace:
        act = e["action"]
        if act == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_live, peak_event = cur, dict(live), e
        elif act == "free_completed" or (act == "free_requested" and e["addr"] not in completes):
            blk = live.pop(e["addr"], None)
            if blk is not None:
                cur -= blk["size"]
    sites: dict[str, list[int]] = {}
    for blk in peak_live.values():
        s = sites.setdefault(_site(blk.get("frames", [])), [0, 0])
        s[0] += blk["size"]
        s[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    return {
        "peak_bytes": peak,
        "live_blocks_at_peak": len(peak_live),
        "peak_reached_by": None if peak_event is None else {
            "size": peak_event["size"], "site": _site(peak_event.get("frames", [])),
            "stack": [_site([f]) for f in peak_event.get("frames", [])
                      if "lakd/" in f.get("filename", "")][:8]},
        "sites": [{"site": k, "bytes": v[0], "blocks": v[1]} for k, v in ranked[:top]],
        "other_bytes": sum(v[0] for _, v in ranked[top:]),
    }


def measure(method: str, args) -> dict:
    import torch

    from lakd.analysis.cost import _batch, _setup
    from lakd.engine.step import training_step

    dev = torch.device(args.device)
    d, opt, params, channels_last = _setup(args.teacher, None, args.student, method, args.num_classes,
                                           list(args.overrides), dev)
    batch = _batch(args.student, args.batch_size, args.num_classes, dev)
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for _ in range(2):
        training_step(d, opt, scaler, batch, None)
    torch.cuda.synchronize()
    opt.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    training_step(d, opt, scaler, batch, None)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = analyze(snap, dev.index or 0, args.top)
    out["max_memory_allocated_minus_before"] = int(torch.cuda.max_memory_allocated(dev) - before)
    del d, opt, params, batch
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="scratch,lakd")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        print("error: gpu_memory_peak.py reads the CUDA allocator's history; run it on a CUDA device "
              "(for a CPU step's peak use lakd bench memory --device cpu)", file=sys.stderr)
        return 2
    res = {}
    for m in args.methods.split(","):
        r = res[m] = measure(m, args)
        mib = 2 ** 20
        print(f"== {m}: peak {r['peak_bytes'] / mib:.1f} MiB (max_memory_allocated: "
              f"{r['max_memory_allocated_minus_before'] / mib:.1f}), {r['live_blocks_at_peak']} blocks alive; "
              f"reached by {r['peak_reached_by']['size'] / mib:.2f} MiB at {r['peak_reached_by']['site']}")
        print("   stack: " + " <- ".join(r["peak_reached_by"]["stack"]))
        for s in r["sites"]:
            print(f"   {s['bytes'] / mib:8.2f} MiB  {s['blocks']:4d} blocks  {s['site']}")
        print(f"   {r['other_bytes'] / mib:8.2f} MiB  elsewhere")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

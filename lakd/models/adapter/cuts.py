"""Default cut points, and the list of candidates ``lakd models --blocks`` shows."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import LakdError
from .heads import is_global_pool
from .tracing import last_nodes, propagate, tensor_shape, trace, value_nodes


def default_cuts(model: nn.Module, gm: fx.GraphModule, qualnames: dict) -> tuple[str | None, list[str]]:
    """(stem, blocks) when the user names none: torchvision ResNets' residual blocks; timm's ``feature_info``
    stages, each cut after every block inside it (``within``); otherwise the top-level children that run in
    sequence before global pooling (opening the largest container while fewer than three do, e.g. ``features`` or
    ``trunk_output``), the first of three or more being the stem."""
    from torchvision.models.resnet import ResNet

    if isinstance(model, ResNet):
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]
        return "maxpool", blocks
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    pools = [n for n in value_nodes(gm.graph) if is_global_pool(gm, n)]
    pool = pools[-1] if pools else None
    limit = pos[pool.args[0]] if pool is not None else len(pos)
    last_node = last_nodes(qualnames)

    def in_sequence(paths: list[str]) -> list[str]:
        """The paths whose nodes all run before pooling, ordered, each ending after the previous one."""
        spans = []
        for path in paths:
            ps = [pos[n] for n, q in qualnames.items() if q == path or q.startswith(path + ".")]
            if ps and max(ps) <= limit:
                spans.append((min(ps), max(ps), path))
        out, last = [], -1
        for _, hi, path in sorted(spans):
            if hi > last:
                out.append(path)
                last = hi
        return out

    def children(path: str) -> list[str]:
        mod = model.get_submodule(path) if path else model
        return [f"{path}.{c}" if path else c for c, _ in mod.named_children()]

    def size(path: str) -> int:
        return sum(p.numel() for p in model.get_submodule(path).parameters())

    def within(stage: str) -> list[str]:
        """A timm stage cut after each of its blocks: its children in sequence, opening the largest while it is
        a plain container (``nn.Sequential``/``nn.ModuleList``: ResNet's ``layer1``, ConvNeXt's and Swin's
        ``blocks``) -- as torchvision ResNets are cut per residual block. The stage's own end stays a cut."""
        seq = [c for c in in_sequence(children(stage)) if not isinstance(model.get_submodule(c), nn.Identity)]
        while seq:
            big = max(seq, key=size)
            inner = in_sequence(children(big))
            if not isinstance(model.get_submodule(big), (nn.Sequential, nn.ModuleList)) or len(inner) < 2:
                break
            k = seq.index(big)
            seq = seq[:k] + inner + seq[k + 1:]
        if len(seq) < 2:
            return [stage]
        if last_node.get(seq[-1]) is not last_node.get(stage):  # the stage runs more after its last child
            seq[-1] = stage
        return seq

    fi = getattr(model, "feature_info", None)
    if isinstance(fi, list) and fi and all(isinstance(d, dict) and "module" in d for d in fi):
        mods = [d["module"] for d in fi]
        stem = None
        if len(fi) > 1 and fi[0].get("reduction", 4) <= 2:
            stem, mods = mods[0], mods[1:]
        # the modules that run between two stages (EfficientNet's blocks.3 between feature stages blocks.2
        # and blocks.4) are cut after each of their blocks too, rather than joined to the next stage's first
        order, prev = [], last_node.get(stem) if stem else None
        for m in mods:
            parent = m.rpartition(".")[0]
            gap = []
            if prev is not None and m in children(parent):
                gap = [c for c in in_sequence(children(parent)) if pos[prev] < pos[last_node[c]] < pos[last_node[m]]]
            if gap and not order:  # between the stem and the first stage (ResNet's maxpool): the stem's end
                stem, gap = gap[-1], []
            order += gap + [m]
            prev = last_node.get(m)
        return stem, [b for m in order for b in within(m)]

    seq = in_sequence(children(""))
    # open the largest container while fewer than three pieces run in sequence (`features`, `trunk_output`)
    while len(seq) < 3:
        opened = [p for p in seq if len(in_sequence(children(p))) >= 2]
        if not opened:
            break
        big = max(opened, key=size)
        k = seq.index(big)
        seq = seq[:k] + in_sequence(children(big)) + seq[k + 1:]
    if not seq:
        raise LakdError(f"found no module that runs before global pooling in {type(model).__name__}; name the cut "
                        f"points with model.blocks (see `lakd models --blocks`)")
    if len(seq) >= 3:
        return seq[0], seq[1:]
    return None, seq


def cut_candidates(model: nn.Module, input_size: int = 224, leaf_modules=()) -> list[tuple[str, tuple | None]]:
    """Every module path that can be a cut point, in run order, with its output shape at ``input_size``."""
    was = model.training
    model.eval()
    try:
        gm, qn = trace(model, leaf_modules)
        p = next(model.parameters(), None)
        propagate(gm, torch.zeros(1, 3, input_size, input_size, dtype=p.dtype if p is not None else None),
                   type(model).__name__)
    finally:
        model.train(was)
    last = last_nodes(qn)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = {n for n, _ in model.named_modules() if n}
    rows = [(path, tensor_shape(node)) for path, node in last.items() if path in modules]
    rows.sort(key=lambda r: (pos[last[r[0]]], -r[0].count(".")))
    return rows



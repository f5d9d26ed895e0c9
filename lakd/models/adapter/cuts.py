"""Default cut points, and the list of candidates ``lakd models --blocks`` shows."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import LakdError
from .heads import is_global_pool, live_nodes
from .tokens import token_pool
from .tracing import last_nodes, propagate, tensor_shape, trace, value_nodes


def dominators(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes every path of the graph passes: after such a node, the only tensor a later node still needs is
    its own output (no skip path or parallel branch spans it), so cutting there strands nothing -- in LAKD, every
    value carried across the cut is detached, and a branch spanning it would lose the later losses' gradient.
    Needs the shapes (``propagate``): values that are not tensors (sizes read off a tensor) carry no gradient and
    do not count."""
    live = live_nodes(gm)  # what the network computes and drops (an unused auxiliary head) spans nothing
    nodes = [n for n in gm.graph.nodes if n in live]
    pos = {n: i for i, n in enumerate(nodes)}
    out = set()
    reach = -1  # the furthest use of a tensor made before the current node
    for n in nodes:
        users = [u for u in n.users if u in live]
        if n.op in ("placeholder", "call_module", "call_function", "call_method") and users \
                and reach <= pos[n]:
            out.add(n)
        if n.op != "output" and n.meta.get("tensor_meta") is not None and hasattr(n.meta["tensor_meta"], "shape"):
            reach = max([reach] + [pos[u] for u in users])
    return out


def default_cuts(model: nn.Module, gm: fx.GraphModule, qualnames: dict) -> tuple[str | None, list[str]]:
    """(stem, blocks) when the user names none: the family's cut points (``family_cuts``), each moved to where
    every path of the graph passes (``dominators``): a cut inside a branch or on a skip path (a block that a skip
    connection spans) is replaced by the first point after it that all paths pass (where the branches join), so
    no parameter is left out of every loss. Only what the logits depend on counts (``live_nodes``)."""
    live = live_nodes(gm)
    qualnames = {n: q for n, q in qualnames.items() if n in live}
    stem, blocks = family_cuts(model, gm, qualnames)
    dom = dominators(gm)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = last_nodes(qualnames)
    ordered = sorted(dom, key=pos.__getitem__)

    def moved(path: str | None) -> str | None:
        node = last.get(path) if path else None
        if node is None or node in dom:
            return path
        after = next((d for d in ordered if pos[d] > pos[node]), None)
        return None if after is None else qualnames.get(after, after.name)

    out: list[str] = []
    seen = set()
    stem = moved(stem)
    if stem is not None:
        seen.add(last.get(stem) or stem)
    for b in blocks:
        m = moved(b)
        key = last.get(m, m) if m is not None else None
        if m is not None and key not in seen:
            seen.add(key)
            out.append(m)
    if not out and stem is not None:
        return None, [stem]
    return stem, out


def family_cuts(model: nn.Module, gm: fx.GraphModule, qualnames: dict) -> tuple[str | None, list[str]]:
    """(stem, blocks) by family, before ``default_cuts`` moves them onto ``dominators``: torchvision ResNets' residual blocks; timm's ``feature_info``
    stages, each cut after every block inside it (``within``); otherwise the top-level children that run in
    sequence before global pooling (opening the largest container while fewer than three do, e.g. ``features`` or
    ``trunk_output``), the first of three or more being the stem."""
    from torchvision.models.resnet import ResNet
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, ResNet):
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]
        return "maxpool", blocks
    if isinstance(model, VisionTransformer):  # every encoder block, as timm's ViTs are cut
        return None, [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    live = live_nodes(gm)
    # the head's pooling: of a feature map, or of a token sequence (a mean of its tokens, its class token)
    pools = [n for n in value_nodes(gm.graph) if n in live and (is_global_pool(gm, n) or token_pool(n) is not None)]
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
        # entries that share their reduction with another are single blocks, not stages (a ViT lists every
        # transformer block at the patch size's reduction): each is cut whole, not opened into its layers
        reductions = [d.get("reduction") for d in fi]
        whole = {d["module"] for d in fi if d.get("reduction") is not None and reductions.count(d["reduction"]) > 1}
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
        return stem, [b for m in order for b in ([m] if m in whole else within(m))]

    def straddled(paths: list[str]) -> list[str]:
        """``paths`` with every module that runs both before and after the pooling opened into its children (a
        user's wrapper around the whole network, whose head runs after the pooling)."""
        out = []
        for path in paths:
            ps = [pos[n] for n, q in qualnames.items() if q == path or q.startswith(path + ".")]
            out += straddled(children(path)) if ps and min(ps) <= limit < max(ps) else [path]
        return out

    seq = in_sequence(straddled(children("")))
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


def cut_candidates(model: nn.Module, input_size: int = 224, leaf_modules=(),
                   every: bool = False) -> list[tuple[str, tuple | None]]:
    """The cut points of ``model`` in run order, with their output shapes at ``input_size``: the module paths
    whose output every path of the graph passes (``dominators``), and the points where branches join (a sum or
    concatenation of two paths, named by its traced node); ``every``: every module path, a cut on a branch or a
    skip path included."""
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
    dom = dominators(gm)
    rows = [(path, tensor_shape(node)) for path, node in last.items()
            if path in modules and (every or node in dom)]
    ends = {last[path] for path, _ in rows}
    if not every:
        listed = {path for path, _ in rows}
        joins = [n for n in dom if n not in ends and n.op in ("call_function", "call_method")
                 and sum(isinstance(a, fx.Node) and a.meta.get("tensor_meta") is not None for a in n.args) >= 2
                 and not any(qn.get(n, n.name).startswith(path + ".") for path in listed)]  # a block's own sum
        rows += [(qn.get(n, n.name), tensor_shape(n)) for n in joins]
        last.update({qn.get(n, n.name): n for n in joins})
    rows.sort(key=lambda r: (pos[last[r[0]]], -r[0].count(".")))
    return rows

"""The centre of the adapter: a traced graph cut into a stem, one piece per block and a head, each run alone.

The graph is split, in its own node order, into a stem, one piece per block and a head: each piece is an
``fx.GraphModule`` that calls the network's own modules, so the parameters are shared, the network's
``state_dict`` names stay valid (the adapter registers the network's top-level children as its own) and a
checkpoint of the plain network loads.

Every value that crosses a cut is carried to the next piece (``Carry``), so a skip connection spanning a cut
works, and LAKD's ``detach_state`` detaches all of them.

Why hand-written: no library runs one block of a traced graph alone from a detached input. torchvision's
``create_feature_extractor`` returns chosen nodes of one whole forward pass; ``torch.fx.passes.split_module``
splits a graph but its parent graph runs every piece in one call, hiding the block outputs and the carried
values that LAKD detaches between its local modules; timm's ``forward_intermediates`` also runs the whole
network. The distillers need block ``k`` as a function of the carry alone.

In-place safety: a piece whose body holds an in-place op (``nn.ReLU(inplace=True)``, ``x.add_(y)``,
``F.relu(x, inplace=True)``...) clones the values it receives before running, so it never rewrites a tensor that
an earlier piece returned: a teacher feature taken at a cut stays the value at that cut, and LAKD's detached
carry does not alias a tensor that an earlier module's backward still needs.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from ...errors import LakdError
from ..base import Carry, FeatureNet, FeatureShape, replace_children, token_grid
from .cuts import default_cuts
from .heads import (
    FrozenHeadRun,
    aliases,
    fshape,
    head_pair,
    is_global_pool,
    is_relu,
    is_trivial,
    live_nodes,
    mutated,
    pool_layout,
    timm_classifier,
    unfreezable,
)
from .tokens import token_layout, token_pool
from .tracing import modes_differ, propagate, resolve_cut, tensor_shape, trace, value_nodes


class _Split:
    """One traced graph cut into stem, blocks and head pieces (one per mode when train and eval graphs differ)."""

    def __init__(self, gm: fx.GraphModule, qualnames: dict, stem: str | None, blocks: list[str],
                 classifier: str | None, label: str, map_problem: str | None = None):
        self.gm, self.label = gm, label
        live = live_nodes(gm)
        nodes = [n for n in value_nodes(gm.graph) if n in live or n.op == "placeholder"]
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        logits = out_node.args[0]
        if not isinstance(logits, fx.Node) or (logits.op == "call_function" and isinstance(logits.target, type)):
            kind = logits.target.__name__ if isinstance(logits, fx.Node) else type(logits).__name__
            raise LakdError(f"{label} returns {kind} (in training or eval mode), not one tensor of logits; turn its "
                            f"extra outputs off with constructor options (e.g. model.kwargs={{aux_logits: false}}) "
                            f"or wrap it with module:<package.module>:<callable> returning a module whose forward "
                            f"gives logits")
        placeholders = [n for n in nodes if n.op == "placeholder"]
        reached = {n: q for n, q in qualnames.items() if n in live}

        def resolve(name):  # a module path names its last node that the logits depend on
            if not any(q == name or q.startswith(name + ".") for q in reached.values()) \
                    and any(q == name or q.startswith(name + ".") for q in qualnames.values()):
                raise LakdError(f"cut point {name!r} of {label} is on a branch that does not reach the output (the "
                                f"network computes it and drops it); cut the network where its logits pass "
                                f"(see `lakd models --blocks`)")
            return resolve_cut(name, reached, label)

        cuts = [resolve(c) for c in blocks]
        stem_node = resolve(stem) if stem else placeholders[0]
        order = [stem_node, *cuts]
        names = [stem or "input", *blocks]
        for a, b, na, nb in zip(order, order[1:], names, names[1:]):
            if pos[b] <= pos[a]:
                raise LakdError(f"cut points out of order for {label}: {nb!r} runs before (or is) {na!r}; list "
                                f"model.blocks in the order the network runs them (see `lakd models --blocks`)")
        #: the token layout ``(P, H, W)`` of each cut that is a B x N x C sequence (None: a map, or the input)
        self.token_cuts = [token_layout(n) if n.op != "placeholder" else None for n in order]
        # the head: global pooling after the last cut; its input is the last feature map. The last one: squeeze-
        # excitation layers pool too, inside the blocks. Only pooling the logits depend on counts.
        pools = [n for n in nodes if is_global_pool(gm, n)]
        tpools = [(n, k) for n in nodes if pos[n] > pos[order[-1]] and (k := token_pool(n)) is not None]
        later = [n for n in pools if pos[n] > pos[order[-1]]]
        #: why this network gives logits but no feature maps (None when it pools a map or a token grid)
        self.map_problem = map_problem
        self.heads: list[fx.Node] = []
        self.fmap_tokens = None
        if self.map_problem is None and tpools and (not later or pos[tpools[-1][0]] > pos[later[-1]]):
            self.map_problem = self.setup_token_head(gm, qualnames, nodes, pos, tpools, logits, classifier, label)
        elif self.map_problem is None and pools:
            self.setup_head(gm, qualnames, nodes, pos, pools, order, names, classifier, label, logits)
        elif self.map_problem is None:  # a flattened map (VGG at its size), an attention-pooling head: logits only
            self.map_problem = (
                f"{label} has no global pooling of a feature map before its classifier (it classifies tokens "
                f"without averaging them or taking a class token, or a flattened map, as VGG does), so it gives "
                f"logits but no feature maps; use a method that needs only the logits (e.g. method=kd), or a network "
                f"that pools a B x C x H x W map or its tokens")
        if self.map_problem:
            self.setup_logits_only(gm, qualnames, nodes, pos, classifier, label)
        # segments: 0 = stem, 1..n = blocks, n+1 = head
        seg: dict[fx.Node, int] = {}
        bounds = [pos[n] for n in order]
        for n in nodes:
            seg[n] = 0 if n.op == "placeholder" else sum(pos[n] > b for b in bounds)
        head = len(order)
        carry: list[list[fx.Node]] = []
        for s in range(head):
            live_here = [v for v in nodes if seg[v] <= s and (v is order[s] or any(
                seg.get(u, head) > s for u in v.users if u in live))]
            carry.append(live_here)
        self.mains = [carry[s].index(order[s]) for s in range(head)]
        self.nhwc_cuts = [self._nhwc_at(n) for n in order]
        self.inputs = placeholders
        self.defaults = [p.args[0] if p.args else None for p in placeholders]
        self.pieces_spec = []
        for s in range(head + 1):
            ins = placeholders if s == 0 else carry[s - 1]
            body = [n for n in nodes if seg[n] == s and n.op != "placeholder"]
            if s < head:
                outs = list(carry[s])
                relu_cut = order[s] if s > 0 and is_relu(gm, order[s]) else None
                pre = (order[s].args[0] if relu_cut is not None else order[s]) if s > 0 else None
                self.pieces_spec.append((ins, body, outs + ([pre] if pre is not None else []), relu_cut))
            else:
                self.pieces_spec.append((ins, body, [logits, *self.head_outputs, *self.heads], None))
        self.cuts = order
        self.build()

    # ----- the head --------------------------------------------------------------------------------------------
    def setup_head(self, gm, qualnames, nodes, pos, pools, order, names, classifier, label, logits) -> None:
        """The head of a network that pools its last feature map: pooling, last map, classifier, class maps."""
        pool = pools[-1] if pos[pools[-1]] > pos[order[-1]] else None
        earlier = pools[-1] if pool is None else None
        if pool is None and earlier is not None:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of global "
                            f"pooling {qualnames.get(earlier, earlier.name)!r}); end model.blocks at or before it")
        fmap = pool.args[0]
        if pos[fmap] < pos[order[-1]]:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of "
                            f"global pooling {qualnames.get(pool, pool.name)!r}); end model.blocks at or before it")
        self.pool_shape = tensor_shape(pool)
        # the layout of the network's maps, read from its final pooling: a B x H x W x C network (Swin) has every
        # cut in that layout but the input image; its features are handed to the distillers permuted to NCHW
        self.nhwc = pool_layout(gm, pool) == "nhwc"
        self.fmap = fmap
        self.setup_classifier(gm, qualnames, nodes, pos, pool, logits, classifier, label)

    def setup_token_head(self, gm, qualnames, nodes, pos, tpools, logits, classifier, label) -> str | None:
        """The head of a token network: the final sequence (the last map: its patch tokens as a grid), how it is
        pooled (a mean of the patch tokens: class maps; a class token: none) and the classifier. Returns why the
        network gives logits only, or None."""
        seqs = {k[1] for _, k in tpools}
        seq = max(seqs, key=pos.__getitem__)
        layout = token_layout(seq)
        if layout is None:
            return (f"{label} classifies a sequence of {tensor_shape(seq)[1]} tokens that the adapter cannot lay out "
                    f"as a grid of patch tokens (it found no H x W map they were made from), so it gives logits but "
                    f"no feature maps; use a method that needs only the logits (e.g. method=kd)")
        self.nhwc, self.fmap, self.fmap_tokens = False, seq, layout
        mine = [(n, k) for n, k in tpools if k[1] is seq]
        means = [n for n, k in mine if k[0] == "mean"]
        pool = means[-1] if means else mine[-1][0]
        self.pool_shape = tensor_shape(pool)
        self.setup_classifier(gm, qualnames, nodes, pos, pool, logits, classifier, label)
        kind, _, at = token_pool(pool)
        p = layout[0]
        if kind == "select" or len(mine) > 1:
            picked = [f"x[:, {k[2]}]" for _, k in mine if k[0] == "select"]
            which = ("class token" if len(picked) == 1 else "class and distillation tokens") + \
                (" and the mean of its patch tokens" if means else "")
            self.cam_problem = (
                f"{label} classifies its {which} ({' and '.join(picked)}), not the average of its patch tokens "
                f"alone, so no class maps over the patch grid add up to its logits; use a method that does not need "
                f"class maps (for LAKD set lakd.att_weight=0), or build the network with average pooling (timm: "
                f"model.kwargs={{global_pool: avg}})")
        elif at != p:
            self.cam_problem = (
                f"{label} averages {'its ' + str(p - at) + ' class/distillation tokens with ' if at < p else 'part of '}"
                f"its patch tokens, so no class maps over the patch grid add up to its logits; use a method that "
                f"does not need class maps, or average the patch tokens only")
        return None

    def setup_classifier(self, gm, qualnames, nodes, pos, pool, logits, classifier, label) -> None:
        """The classifier (for the embedding and class maps), the embedding (its input) and the head after pooling
        (for class maps: the graph from the pooled vector to the logits)."""
        live = set(nodes)
        self.heads = head_pair(gm, logits) or []
        if self.heads and any(pos[h] < pos[pool] for h in self.heads):
            self.heads = []
        cls_node = None
        if classifier:
            cls_node = resolve_cut(classifier, qualnames, label)
            if cls_node.op != "call_module" or not isinstance(gm.get_submodule(cls_node.target), nn.Linear):
                raise LakdError(f"model.classifier={classifier!r} of {label} is not an nn.Linear call")
            if pos[cls_node] < pos[pool]:
                raise LakdError(f"model.classifier={classifier!r} of {label} runs before global pooling")
        elif self.heads:
            cls_node = self.heads[0]
        else:
            linears = [n for n in nodes if pos[n] > pos[pool] and n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), nn.Linear)]
            cls_node = linears[-1] if linears else None
        self.classifier_path = cls_node.target if cls_node is not None else None
        #: the logits are the classifier's output itself (not two heads' mean; after it only reshapes: timm's flatten)
        end = logits
        while is_trivial(gm, end) and end.args and isinstance(end.args[0], fx.Node):
            end = end.args[0]
        self.logits_are_classifier = cls_node is end
        self.cam_problem = None if cls_node is not None else (
            f"{label} has no nn.Linear after global pooling; name its classifier with model.classifier=<module path>")
        emb = cls_node.args[0] if cls_node is not None else pool
        # timm's pre-logits of a two-head network: the mean of the heads' inputs (DeiT's two tokens)
        self.emb_parts = 1
        if len(self.heads) == 2 and self.heads[1].args[0] is not self.heads[0].args[0]:
            self.emb_parts = 2
        self.head_outputs = [self.fmap, emb] + ([self.heads[1].args[0]] if self.emb_parts == 2 else [])
        # the head after pooling, for class maps: every node from the pooled vector to the logits
        body = self._ancestors(logits, stop=pool)
        self.cam_spec, self.cam_fast = None, False
        if cls_node is None:
            return
        outside = [n for n in body if n.op != "get_attr" and any(
            a is not pool and a not in body for a in n.all_input_nodes)]
        if outside or any(n not in live for n in body if n.op != "get_attr"):
            self.cam_problem = (f"the classifier {cls_node.target!r} of {label} sees more than the pooled map; "
                                f"name another with model.classifier=<module path>")
            return
        core = [n for n in body if n.op != "get_attr" and not is_trivial(gm, n)]
        self.cam_fast = core == [cls_node] and logits is cls_node
        bad = unfreezable(gm, body)
        if bad is not None:
            what = type(gm.get_submodule(bad.target)).__name__ if bad.op == "call_module" else \
                getattr(bad.target, "__name__", str(bad.target))
            self.cam_problem = (
                f"the head of {label} after its global pooling holds {what} at {qualnames.get(bad, bad.name)!r}, "
                f"which class maps cannot pass through (they pass Linear layers, normalisations, elementwise "
                f"activations and reshapes); use a method that does not need class maps (for LAKD set "
                f"lakd.att_weight=0), or name the classifier with model.classifier=<module path>")
            return
        self.cam_spec = ([pool], body, [logits], None)

    def setup_logits_only(self, gm, qualnames, nodes, pos, classifier, label) -> None:
        """The head of a network without a pooled feature map: only its logits come out."""
        self.nhwc, self.pool_shape, self.fmap, self.fmap_tokens = False, None, None, None
        self.cam_spec, self.cam_fast, self.emb_parts, self.heads = None, False, 1, []
        self.logits_are_classifier = False
        linears = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
        cls_node = resolve_cut(classifier, qualnames, label) if classifier else (linears[-1] if linears else None)
        self.classifier_path = cls_node.target if cls_node is not None and cls_node.op == "call_module" else None
        self.cam_problem = self.map_problem
        self.head_outputs = []

    @property
    def num_classes(self) -> int:
        return int(tensor_shape(self.pieces_spec[-1][2][0])[1])

    def _nhwc_at(self, node: fx.Node) -> bool:
        """Is this value B x H x W x C? Every map of an NHWC network is, but the input image."""
        return self.nhwc and node.op != "placeholder"

    def layout(self, node: fx.Node) -> tuple[bool, tuple | None]:
        """``(nhwc, tokens)`` of a cut or the last map, as ``Carry`` takes them."""
        if node is self.fmap and self.fmap_tokens is not None:
            return False, self.fmap_tokens
        if node in self.cuts:
            i = self.cuts.index(node)
            return self.nhwc_cuts[i], self.token_cuts[i]
        return self._nhwc_at(node), None

    def shape(self, node: fx.Node) -> FeatureShape:
        """A cut's (or the last map's) shape as the distillers see it: channels, height, width."""
        nhwc, tokens = self.layout(node)
        if tokens is not None:
            return FeatureShape(int(tensor_shape(node)[2]), tokens[1], tokens[2])
        return fshape(node, self.label, nhwc)

    @staticmethod
    def _ancestors(node: fx.Node, stop: fx.Node) -> list[fx.Node]:
        seen, todo = {}, [node]
        while todo:
            n = todo.pop()
            if n is stop or n in seen:
                continue
            seen[n] = True
            todo.extend(n.all_input_nodes)
        return [n for n in node.graph.nodes if n in seen]

    def _piece(self, ins, body, outs, relu_cut) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in ins:
            env[n] = g.placeholder(n.name)
        # an input this piece would rewrite in place (through a view or directly) is cloned first: the tensor
        # belongs to the piece before (a teacher feature, the detached carry of an earlier LAKD module)
        root = {n: n for n in ins}
        for n in body:
            a = aliases(self.gm, n)
            if a is not None and a in root:
                root[n] = root[a]
        rewritten = {root[m] for n in body if (m := mutated(self.gm, n)) is not None and m in root}
        for n in ins:
            if n in rewritten:
                env[n] = g.call_function(_clone, (env[n],))

        def arg(a):
            if a not in env and a.op == "get_attr":  # parameters used functionally: fetched where used
                env[a] = g.get_attr(a.target)
            return env[a]

        for n in body:
            if n.op == "get_attr":
                continue
            if n is relu_cut:  # out of place, so the pre-activation (the ReLU's input) survives for OFD
                env[n] = g.call_function(torch.relu, (arg(n.args[0]),))
            else:
                env[n] = g.node_copy(n, arg)
        g.output(tuple(arg(n) for n in outs))
        return fx.GraphModule(self.gm, g, "Piece")

    def build(self) -> None:
        """(Re)create the pieces from the original modules (after ``.to()`` replaced buffer tensors)."""
        self.pieces = [self._piece(*spec) for spec in self.pieces_spec]
        self.cam = self._piece(*self.cam_spec) if self.cam_spec and not self.cam_fast else None


class AdaptedNet(FeatureNet):
    """A ``FeatureNet`` over any traceable network (see the module doc). Build it with ``adapt``."""

    def __init__(self, model: nn.Module, blocks: list[str] | None = None, stem: str | None = None,
                 classifier: str | None = None, leaf_modules=(), input_size: int = 224, name: str | None = None):
        nn.Module.__init__(self)
        # the network's own children (and top-level tensors) become the adapter's: same state_dict names.
        # Private nn.Module dictionaries, on purpose: the public add_module / register_parameter /
        # register_buffer refuse a name that is already an attribute, and a network's child is often named like
        # a FeatureNet attribute (torchvision's `classifier`, timm's `pool`), which the adapter must keep both of.
        # Checked on torch 2.14; tests/test_adapter.py::test_private_module_dicts_the_adapter_relies_on
        # fails loudly if torch renames them or stops keeping them as plain dicts.
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
        object.__setattr__(self, "_root", model)
        # the state dict's version for the top level is the network's (MNASNet reads it to choose its layout)
        self._version = getattr(model, "_version", nn.Module._version)
        self.input_size = int(input_size)
        self.label = name or type(model).__name__
        if _root_is_leaf(model, leaf_modules):  # the whole network as one call: logits only
            self.cut_names = {"stem": None, "blocks": [], "classifier": classifier}
            sp = _OpaqueSplit(model, self.label, input_size)
            object.__setattr__(self, "_splits", {True: sp, False: sp})
            self.stage_ends = []
            return
        was = model.training
        graphs = {}
        try:
            for mode in (True, False):
                model.train(mode)
                graphs[mode] = trace(model, leaf_modules, self.label)
            p = next(model.parameters(), None)
            x = torch.zeros(1, 3, self.input_size, self.input_size,
                            device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
            differ = modes_differ(graphs[True][1], graphs[False][1])
            model.eval()  # the train-mode graph too: shapes without touching BatchNorm statistics
            for mode in (False, True) if differ else (False,):
                propagate(graphs[mode][0], x, self.label)
        finally:
            model.train(was)
        gm, qn = graphs[False]
        no_cuts = None
        if blocks is None:
            try:
                dstem, blocks = default_cuts(model, gm, qn)
                stem = stem if stem is not None else dstem
            except LakdError as e:  # methods that need only logits need no cut: the network runs as one piece
                no_cuts = (f"{str(e).rstrip('.')}, so it gives logits but no feature maps (methods that need only "
                           f"the logits, e.g. method=kd, run it as it is)")
                stem, blocks = None, []
        blocks = list(blocks)
        if not blocks and no_cuts is None:
            raise LakdError(f"model.blocks for {self.label} is empty; give at least one cut point")
        self.cut_names = {"stem": stem, "blocks": blocks, "classifier": classifier}
        cls = classifier or timm_classifier(model)
        eval_split = _Split(gm, qn, stem, blocks, cls, self.label, no_cuts)
        train_split = eval_split
        if differ:
            train_split = _Split(*graphs[True], stem, blocks, cls, self.label, no_cuts)
        object.__setattr__(self, "_splits", {True: train_split, False: eval_split})
        self.train(was)
        # stages end where the resolution changes (next block's map is smaller), and at the last block
        self.stage_ends = list(range(1, len(blocks) + 1))
        if eval_split.map_problem:  # no maps, so no resolutions to read stages from: every block ends one
            return
        b = [eval_split.shape(n) for n in eval_split.cuts[1:]]
        self.stage_ends = [i + 1 for i in range(len(b))
                           if i == len(b) - 1 or (b[i].height, b[i].width) != (b[i + 1].height, b[i + 1].width)]
        if len(self.stage_ends) == 1 and len(b) >= 2 and all(t is not None for t in eval_split.token_cuts[1:]):
            # a plain ViT keeps one grid through all its blocks: its stages are four equal groups of blocks
            n = len(b)
            self.stage_ends = sorted({max(1, round(n * k / 4)) for k in range(1, 5)})
        self._check_class_maps()

    @torch.no_grad()
    def _check_class_maps(self) -> None:
        """Class maps must add up to the logits: on two random images (eval mode), the class maps averaged over
        the positions plus the head's offset (the classifier's bias for a plain linear head) must give the logits.
        Where they do not, methods that need class maps are refused (``missing``) with the difference measured."""
        sp = self._splits[False]
        if sp.map_problem or sp.cam_problem:
            return
        p = next(self.parameters())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, self.input_size, self.input_size, generator=g).to(p.device, p.dtype)
        was = self.training
        self.eval()
        try:
            h = self.run_blocks(self.stem_forward(x), 0, self.num_blocks)
            logits, fmap, _ = self.head_forward(h, return_map=True)
            cams = self.class_maps(fmap)
            offset = self.class_map_offset(fmap)
        finally:
            self.train(was)
        part = (logits - offset).abs().amax()
        err = float((cams.mean((2, 3)) + offset - logits).abs().amax() / part.clamp_min(1e-12))
        if err > 1e-3:
            problem = (f"the class maps of {self.label} do not add up to its logits (averaged over the positions, "
                       f"plus the head's offset, they differ from the logits by {err:.0%}); use a method that does "
                       f"not need class maps (for LAKD set lakd.att_weight=0), or name the classifier that reads "
                       f"the pooled map with model.classifier=<module path>")
            for s in self._splits.values():
                s.cam_problem = problem

    # ----- plumbing ------------------------------------------------------------------------------
    @property
    def _split(self) -> _Split:
        return self._splits[self.training]

    def replace_modules(self, mapping: dict) -> None:
        """As ``FeatureNet.replace_modules``; also in each traced graph (which holds its own references to the
        network's modules), whose pieces are then rebuilt."""
        super().replace_modules(mapping)
        for sp in {id(s): s for s in self._splits.values()}.values():
            replace_children(sp.gm, mapping)
            sp.build()

    def _apply(self, fn, *args, **kwargs):
        # nn.Module._apply is what .to()/.cuda()/.half() all go through (checked on torch 2.14); there is no public
        # hook after a conversion. The root's top-level buffers are rebound to the converted tensors and the
        # pieces rebuilt, since they hold references to the tensors they read (fx get_attr).
        super()._apply(fn, *args, **kwargs)
        root = self._root
        for n in list(root._buffers):
            if n in self._buffers:
                root._buffers[n] = self._buffers[n]
        for sp in {id(s): s for s in self._splits.values()}.values():
            sp.build()  # pieces hold references to buffer tensors that _apply replaced
        return self

    def __deepcopy__(self, memo):
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_splits":
                new.__dict__[k] = copy.deepcopy(v, memo)
        splits = {}
        for mode, sp in self._splits.items():
            if id(sp) not in memo:
                if isinstance(sp, _OpaqueSplit):
                    memo[id(sp)] = _OpaqueSplit(new.__dict__["_root"], sp.label, classes=sp.num_classes)
                    splits[mode] = memo[id(sp)]
                    continue
                c = copy.copy(sp)
                c.gm = copy.deepcopy(sp.gm, memo)  # shares the copied modules through memo
                nodes = {o: n for o, n in zip(sp.gm.graph.nodes, c.gm.graph.nodes)}
                c.pieces_spec = [_remap(s, nodes) for s in sp.pieces_spec]
                c.cam_spec = _remap(sp.cam_spec, nodes) if sp.cam_spec else None
                c.cuts = [nodes[n] for n in sp.cuts]
                c.inputs = [nodes[n] for n in sp.inputs]
                c.fmap = nodes[sp.fmap] if sp.fmap is not None else None
                c.heads = [nodes[n] for n in sp.heads]
                c.build()
                memo[id(sp)] = c
            splits[mode] = memo[id(sp)]
        new.__dict__["_splits"] = splits
        return new

    def feature_info(self, input_size: int | None = None) -> dict:
        """As ``FeatureNet.feature_info``; at the adapter's own input size, read from the traced shapes. A network
        without feature maps raises a one-line ``LakdError`` naming what works with it."""
        sp = self._splits[False]
        if sp.map_problem:  # logits only: their count is known, asking for a map shape is the one-line refusal
            info = _LogitsOnlyInfo(num_classes=sp.num_classes)
            info.problem = sp.map_problem
            return info
        size = input_size or self.input_size
        cache = self.__dict__.setdefault("_feature_info_cache", {})
        if size != self.input_size or size in cache:
            return super().feature_info(size)
        blocks = [sp.shape(n) for n in sp.cuts[1:]]
        logits, fmap, emb = sp.pieces_spec[-1][2][:3]
        cache[size] = {
            "stem": sp.shape(sp.cuts[0]),
            "blocks": blocks,
            "stages": [blocks[e - 1] for e in self.stage_ends],
            "last": sp.shape(fmap),
            "embedding_dim": math.prod(tensor_shape(emb)[1:]),
            "num_classes": int(tensor_shape(logits)[1]),
        }
        return cache[size]

    # ----- the feature interface -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.cut_names["blocks"])

    def stem_forward(self, x):
        sp = self._split
        vals = [x] + sp.defaults[1:]
        return Carry(sp.pieces[0](*vals), sp.mains[0], sp.nhwc_cuts[0], sp.token_cuts[0])

    def block_forward(self, i, h, preact=False):
        sp = self._split
        out = sp.pieces[i + 1](*h.values)
        nhwc, tokens = sp.nhwc_cuts[i + 1], sp.token_cuts[i + 1]
        carry = Carry(out[:-1], sp.mains[i + 1], nhwc, tokens)
        if not preact:
            return carry
        pre = out[-1]
        return carry, (token_grid(pre, tokens) if tokens is not None else pre.permute(0, 3, 1, 2) if nhwc else pre)

    def _head(self, h):
        """The head piece's outputs: logits, last map (B x C x H x W), embedding, the two heads' logits (or ())."""
        sp = self._split
        out = sp.pieces[-1](*h.values)
        logits, fmap, emb = out[:3]
        if sp.emb_parts == 2:  # timm's pre-logits of a two-token network: the mean of the two tokens
            emb = (emb + out[3]) / 2
        heads = out[2 + sp.emb_parts:]
        if sp.fmap_tokens is not None:
            fmap = token_grid(fmap, sp.fmap_tokens)
        elif sp.nhwc:
            fmap = fmap.permute(0, 3, 1, 2)
        if emb.dim() > 2:
            emb = torch.flatten(emb, 1)
        return logits, fmap, emb, tuple(heads)

    def head_forward(self, h, return_map=False):
        sp = self._split
        if sp.map_problem:
            if return_map:
                raise LakdError(sp.map_problem)
            return sp.pieces[-1](*h.values)[0]
        if not return_map:
            return sp.pieces[-1](*h.values)[0]
        return self._head(h)[:3]

    def head_features(self, h):
        if self._split.map_problem:
            raise LakdError(self._split.map_problem)
        logits, fmap, emb, heads = self._head(h)
        more = {"last": fmap, "embedding": emb}
        if heads:
            more["heads"] = heads
        return logits, more

    def block_layout(self, i: int) -> tuple[str, int]:
        sp = self._splits[False]
        tokens = sp.token_cuts[i + 1]
        if tokens is not None:
            return "tokens", tokens[0]
        return ("nhwc", 0) if sp.nhwc_cuts[i + 1] else ("maps", 0)

    def _pieces(self, j: int) -> list[nn.Module]:
        # both modes' pieces (one module when the train and eval graphs agree): train.compile compiles each,
        # so a network whose graph depends on self.training also evaluates compiled; recomputation keeps the
        # buffers of both, which are the same tensors
        return list({id(sp.pieces[j]): sp.pieces[j] for sp in self._splits.values()}.values())

    def stem_modules(self):
        return self._pieces(0)

    def block_modules(self, i):
        return self._pieces(i + 1)

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        sp = self._split
        if sp.classifier_path is None:
            raise LakdError(sp.cam_problem)
        return self._root.get_submodule(sp.classifier_path)

    def class_maps(self, fmap):
        """Class activation maps (B x K x H x W) of the last map: for a linear classifier right after the pooling,
        its weights applied at every position (bias excluded); otherwise the whole head after the pooling applied
        at every position, its nonlinearities frozen at the pooled vector (normalisation statistics, activation
        gains: ``FrozenHeadRun``), minus the head's output at zero (``class_map_offset``). Either way the maps
        averaged over the positions plus that offset are the logits (checked when the network is adapted)."""
        sp = self._split
        if sp.cam_problem:
            raise LakdError(sp.cam_problem)
        if sp.cam_fast:
            return torch.einsum("bchw,kc->bkhw", fmap, self.classifier.weight)
        b, c, hh, ww = fmap.shape
        frozen = self._cam_frozen(fmap)
        rows = self._pooled_shape(fmap.permute(0, 2, 3, 1).reshape(b * hh * ww, c))
        (out,) = FrozenHeadRun(sp.cam, frozen, repeat=hh * ww).run(rows)
        (zero,) = FrozenHeadRun(sp.cam, frozen).run(torch.zeros_like(self._pooled_shape(fmap.mean((2, 3)))))
        return (out.reshape(b, hh, ww, -1) - zero[:, None, None, :]).permute(0, 3, 1, 2)

    def class_map_offset(self, fmap):
        """What the head adds to the class maps' average to give the logits: the classifier's bias (zero without
        one) for a linear head, the head's output at zero (its statistics frozen as in ``class_maps``) otherwise."""
        sp = self._split
        if sp.cam_problem:
            raise LakdError(sp.cam_problem)
        if sp.cam_fast:
            bias = self.classifier.bias
            return torch.zeros(fmap.shape[0], self.classifier.out_features, device=fmap.device, dtype=fmap.dtype) \
                if bias is None else bias.expand(fmap.shape[0], -1)
        frozen = self._cam_frozen(fmap)
        return FrozenHeadRun(sp.cam, frozen).run(torch.zeros_like(self._pooled_shape(fmap.mean((2, 3)))))[0]

    def _pooled_shape(self, v):
        """Pooled vectors (R x C) in the shape the head takes them (R x C, R x C x 1 x 1 or R x 1 x 1 x C)."""
        sp = self._split
        if len(sp.pool_shape) == 4:
            return v[:, None, None, :] if sp.nhwc else v[:, :, None, None]
        return v

    def _cam_frozen(self, fmap):
        """The head's frozen state (normalisation statistics, activation gains) at the pooled vectors of ``fmap``."""
        run = FrozenHeadRun(self._split.cam)
        run.run(self._pooled_shape(fmap.mean((2, 3))))
        return run.frozen

    def missing(self, need):
        if self._split.map_problem and need in ("features", "class_maps", "preact", "heads", "classifier"):
            return self._split.map_problem
        if need == "class_maps":
            return self._split.cam_problem
        if need == "classifier":
            sp = self._split
            if sp.classifier_path is None:
                return sp.cam_problem
            return None if sp.logits_are_classifier and sp.emb_parts == 1 else (
                f"the logits of {self.label} are not its classifier {sp.classifier_path!r} applied to its pooled "
                f"embedding alone ({'the mean of two heads' if sp.heads else 'more runs after it'}); name the "
                f"classifier that gives the logits with model.classifier=<module path>, or use another method")
        if need == "heads":
            return None if self._split.heads else (
                f"{self.label} has one classifier head (a distilled network has two, a class head and a "
                f"distillation head, whose mean is its output: e.g. timm:deit_tiny_distilled_patch16_224)")
        return super().missing(need)

    def forward(self, x, features=False, preact=False, blocks=False):
        return FeatureNet.forward(self, x, features=features, preact=preact, blocks=blocks)


class _Pass(nn.Module):
    def forward(self, x):
        return (x,)


class _Whole(nn.Module):
    """The whole network as one call (``_OpaqueSplit``); not registered under it, so its state stays the root's."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model

    def forward(self, x):
        return (self.model(x),)


class _OpaqueSplit:
    """A network run as one call (its top-level forward untraceable, made a leaf): logits only."""

    nhwc, fmap, fmap_tokens, heads, classifier_path, cam_spec, cam_fast = False, None, None, [], None, None, False
    logits_are_classifier, emb_parts = False, 1

    def __init__(self, model: nn.Module, label: str, input_size: int = 32, classes: int | None = None):
        self.label = label
        self.map_problem = self.cam_problem = (
            f"{label} runs as one call (model.leaf_modules names the network itself), so it gives logits but no "
            f"feature maps; use a method that needs only the logits (e.g. method=kd), or make only the untraceable "
            f"part a leaf (a submodule) so the rest can be cut")
        self.pieces = [_Pass(), _Whole(model)]
        self.mains, self.nhwc_cuts, self.token_cuts, self.defaults, self.cuts = [0], [False], [None], [None], []
        if classes is None:
            p = next(model.parameters(), None)
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    x = torch.zeros(1, 3, input_size, input_size, device=p.device if p is not None else None,
                                    dtype=p.dtype if p is not None else None)
                    classes = int(model(x).shape[1])
            finally:
                model.train(was)
        self.num_classes = classes

    def build(self) -> None:
        pass


def _root_is_leaf(model: nn.Module, leaf_modules) -> bool:
    """Does ``leaf_modules`` name the network itself (its type, its class name or the empty path)?"""
    return any((isinstance(m, type) and isinstance(model, m) and m is not nn.Module)
               or m in (type(model).__name__, "") for m in leaf_modules)


class _LogitsOnlyInfo(dict):
    """``feature_info`` of a network without feature maps: ``num_classes``; any shape is a ``LakdError``."""

    problem = ""

    def __missing__(self, key):
        raise LakdError(self.problem)


def _clone(v):
    """A tensor's copy (other carried values as they are): the input of a piece that rewrites it in place."""
    return v.clone() if isinstance(v, torch.Tensor) else v


def _remap(spec, nodes):
    ins, body, outs, relu = spec
    return ([nodes[n] for n in ins], [nodes[n] for n in body], [nodes[n] for n in outs],
            nodes[relu] if relu is not None else None)



def adapt(model: nn.Module, blocks: list[str] | None = None, stem: str | None = None,
          classifier: str | None = None, leaf_modules=(), input_size: int = 224,
          name: str | None = None) -> FeatureNet:
    """``model`` behind the feature interface. A ``FeatureNet`` is returned as it is.

    ``blocks``: cut points ending each block (module paths or traced node names, in run order; default per
    family, see ``default_cuts``); ``stem``: the cut ending the stem (default: none, or the family's);
    ``classifier``: the module path of the classifier used for class activation maps (default: the last
    ``nn.Linear`` after global pooling); ``leaf_modules``: module types, class names or paths that fx must not
    trace into; ``input_size``: the square image size used to infer feature shapes.
    """
    if isinstance(model, FeatureNet):
        return model
    if not isinstance(model, nn.Module):
        raise LakdError(f"expected an nn.Module to distil, got {type(model).__name__}")
    return AdaptedNet(model, blocks=blocks, stem=stem, classifier=classifier, leaf_modules=leaf_modules,
                      input_size=input_size, name=name)


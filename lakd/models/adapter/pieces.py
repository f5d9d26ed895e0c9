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
from ..base import Carry, FeatureNet, FeatureShape, replace_children
from .cuts import default_cuts
from .heads import aliases, fshape, is_global_pool, is_relu, is_trivial, mutated, pool_layout, timm_classifier
from .tracing import modes_differ, propagate, resolve_cut, tensor_shape, trace, value_nodes


class _Split:
    """One traced graph cut into stem, blocks and head pieces (one per mode when train and eval graphs differ)."""

    def __init__(self, gm: fx.GraphModule, qualnames: dict, stem: str | None, blocks: list[str],
                 classifier: str | None, label: str):
        self.gm, self.label = gm, label
        nodes = value_nodes(gm.graph)
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        logits = out_node.args[0]
        if not isinstance(logits, fx.Node) or (logits.op == "call_function" and isinstance(logits.target, type)):
            kind = logits.target.__name__ if isinstance(logits, fx.Node) else type(logits).__name__
            raise LakdError(f"{label} returns {kind} (in training or eval mode), not one tensor of logits; turn its extra outputs off with constructor options (e.g. "
                            f"model.kwargs={{aux_logits: false}}) or wrap it with module:<package.module>:<callable> "
                            f"returning a module whose forward gives logits")
        placeholders = [n for n in nodes if n.op == "placeholder"]
        cuts = [resolve_cut(c, qualnames, label) for c in blocks]
        stem_node = resolve_cut(stem, qualnames, label) if stem else placeholders[0]
        order = [stem_node, *cuts]
        names = [stem or "input", *blocks]
        for a, b, na, nb in zip(order, order[1:], names, names[1:]):
            if pos[b] <= pos[a]:
                raise LakdError(f"cut points out of order for {label}: {nb!r} runs before (or is) {na!r}; list "
                                f"model.blocks in the order the network runs them (see `lakd models --blocks`)")
        # the head: global pooling after the last cut; its input is the last feature map
        # the last one: squeeze-excitation layers pool too, inside the blocks
        pools = [n for n in nodes if is_global_pool(gm, n)]
        #: why this network gives logits but no feature maps (None when it pools a B x C x H x W map)
        self.map_problem = None
        if not pools:  # a token model (ViT) or a flattened map (VGG): logits only
            self.map_problem = (
                f"{label} has no global pooling of a feature map before its classifier (it classifies tokens, as a "
                f"ViT does, or a flattened map, as VGG does), so it gives logits but no feature maps; use a method "
                f"that needs only the logits (e.g. method=kd), or a network that pools a B x C x H x W map")
            self.setup_logits_only(gm, qualnames, nodes, pos, classifier, label)
        else:
            self.setup_head(gm, qualnames, nodes, pos, pools, order, names, classifier, label)
        # segments: 0 = stem, 1..n = blocks, n+1 = head
        seg: dict[fx.Node, int] = {}
        bounds = [pos[n] for n in order]
        for n in nodes:
            seg[n] = 0 if n.op == "placeholder" else sum(pos[n] > b for b in bounds)
        head = len(order)
        carry: list[list[fx.Node]] = []
        for s in range(head):
            live = [v for v in nodes if seg[v] <= s and (v is order[s] or any(
                seg.get(u, head) > s for u in v.users))]
            carry.append(live)
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
                self.pieces_spec.append((ins, body, [logits, *self.head_outputs], None))
        self.cuts = order
        self.build()

    def setup_head(self, gm, qualnames, nodes, pos, pools, order, names, classifier, label) -> None:
        """The head of a network that pools its last feature map: pooling, last map, classifier, CAM layers."""
        pool = pools[-1] if pools and pos[pools[-1]] > pos[order[-1]] else None
        earlier = pools[-1] if pools and pool is None else None
        if pool is None and earlier is not None:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of global "
                            f"pooling {qualnames.get(earlier, earlier.name)!r}); end model.blocks at or before it")
        if pool is None:
            raise LakdError(f"{label}: found no global pooling (adaptive/average pooling to 1x1 or a mean over "
                            f"H x W) after the last cut {names[-1]!r}; the adapter needs a convolutional network "
                            f"that pools its last feature map before classifying")
        fmap = pool.args[0]
        if pos[fmap] < pos[order[-1]]:
            raise LakdError(f"cut point {names[-1]!r} of {label} lies after the last feature map (the input of "
                            f"global pooling {qualnames.get(pool, pool.name)!r}); end model.blocks at or before it")
        self.pool_shape = tensor_shape(pool)
        # the layout of the network's maps, read from its final pooling: a B x H x W x C network (Swin) has every
        # cut in that layout but the input image; its features are handed to the distillers permuted to NCHW
        self.nhwc = pool_layout(gm, pool) == "nhwc"
        cls_node = None
        if classifier:
            cls_node = resolve_cut(classifier, qualnames, label)
            if cls_node.op != "call_module" or not isinstance(gm.get_submodule(cls_node.target), nn.Linear):
                raise LakdError(f"model.classifier={classifier!r} of {label} is not an nn.Linear call")
            if pos[cls_node] < pos[pool]:
                raise LakdError(f"model.classifier={classifier!r} of {label} runs before global pooling")
        else:
            linears = [n for n in nodes if pos[n] > pos[pool] and n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), nn.Linear)]
            cls_node = linears[-1] if linears else None
        self.classifier_path = cls_node.target if cls_node is not None else None
        self.cam_problem = None if cls_node is not None else (
            f"{label} has no nn.Linear after global pooling; name its classifier with model.classifier=<module path>")
        emb = cls_node.args[0] if cls_node is not None else pool
        # the layers between pooling and the classifier, for dense class maps
        mid = self._ancestors(emb, stop=pool) if cls_node is not None else []
        if any(pos[n] < pos[pool] for n in mid if n.op != "get_attr"):
            self.cam_problem = (f"the classifier {cls_node.target!r} of {label} sees more than the pooled map; "
                                f"name another with model.classifier=<module path>")
            mid = []
        self.mid_trivial = all(is_trivial(gm, n) for n in mid if n.op != "get_attr")
        self.head_outputs = [fmap, emb]
        self.mid_spec = ([pool], mid, [emb], None) if cls_node is not None and not self.mid_trivial else None
        self.fmap = fmap

    def setup_logits_only(self, gm, qualnames, nodes, pos, classifier, label) -> None:
        """The head of a network without a pooled feature map: only its logits come out."""
        self.nhwc, self.pool_shape, self.mid_trivial, self.mid_spec, self.fmap = False, None, True, None, None
        linears = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
        cls_node = resolve_cut(classifier, qualnames, label) if classifier else (linears[-1] if linears else None)
        self.classifier_path = cls_node.target if cls_node is not None and cls_node.op == "call_module" else None
        self.cam_problem = self.map_problem
        self.head_outputs = []

    def _nhwc_at(self, node: fx.Node) -> bool:
        """Is this value B x H x W x C? Every map of an NHWC network is, but the input image."""
        return self.nhwc and node.op != "placeholder"

    def shape(self, node: fx.Node) -> FeatureShape:
        """A cut's (or the last map's) shape as the distillers see it: channels, height, width."""
        return fshape(node, self.label, self._nhwc_at(node))

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

    def _piece(self, ins, body, outs, relu_cut, flatten_emb=False) -> fx.GraphModule:
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
        self.mid = self._piece(*self.mid_spec) if self.mid_spec else None


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
        if blocks is None:
            dstem, blocks = default_cuts(model, gm, qn)
            stem = stem if stem is not None else dstem
        blocks = list(blocks)
        if not blocks:
            raise LakdError(f"model.blocks for {self.label} is empty; give at least one cut point")
        self.cut_names = {"stem": stem, "blocks": blocks, "classifier": classifier}
        cls = classifier or timm_classifier(model)
        eval_split = _Split(gm, qn, stem, blocks, cls, self.label)
        train_split = eval_split
        if differ:
            train_split = _Split(*graphs[True], stem, blocks, cls, self.label)
        object.__setattr__(self, "_splits", {True: train_split, False: eval_split})
        self.train(was)
        # stages end where the resolution changes (next block's map is smaller), and at the last block
        self.stage_ends = list(range(1, len(blocks) + 1))
        if eval_split.map_problem:  # no maps, so no resolutions to read stages from: every block ends one
            return
        b = [eval_split.shape(n) for n in eval_split.cuts[1:]]
        self.stage_ends = [i + 1 for i in range(len(b))
                           if i == len(b) - 1 or (b[i].height, b[i].width) != (b[i + 1].height, b[i + 1].width)]

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
                c = copy.copy(sp)
                c.gm = copy.deepcopy(sp.gm, memo)  # shares the copied modules through memo
                nodes = {o: n for o, n in zip(sp.gm.graph.nodes, c.gm.graph.nodes)}
                c.pieces_spec = [_remap(s, nodes) for s in sp.pieces_spec]
                c.mid_spec = _remap(sp.mid_spec, nodes) if sp.mid_spec else None
                c.cuts = [nodes[n] for n in sp.cuts]
                c.inputs = [nodes[n] for n in sp.inputs]
                c.build()
                memo[id(sp)] = c
            splits[mode] = memo[id(sp)]
        new.__dict__["_splits"] = splits
        return new

    def feature_info(self, input_size: int | None = None) -> dict:
        """As ``FeatureNet.feature_info``; at the adapter's own input size, read from the traced shapes. A network
        without feature maps (a token model) raises a one-line ``LakdError`` naming what works with it."""
        sp = self._splits[False]
        if sp.map_problem:  # logits only: their count is known, asking for a map shape is the one-line refusal
            info = _LogitsOnlyInfo(num_classes=int(tensor_shape(sp.pieces_spec[-1][2][0])[1]))
            info.problem = sp.map_problem
            return info
        size = input_size or self.input_size
        cache = self.__dict__.setdefault("_feature_info_cache", {})
        if size != self.input_size or size in cache:
            return super().feature_info(size)
        sp = self._splits[False]
        if sp.map_problem:
            raise LakdError(sp.map_problem)
        blocks = [sp.shape(n) for n in sp.cuts[1:]]
        logits, fmap, emb = sp.pieces_spec[-1][2]
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
        return Carry(sp.pieces[0](*vals), sp.mains[0], sp.nhwc_cuts[0])

    def block_forward(self, i, h, preact=False):
        sp = self._split
        out = sp.pieces[i + 1](*h.values)
        nhwc = sp.nhwc_cuts[i + 1]
        carry = Carry(out[:-1], sp.mains[i + 1], nhwc)
        if not preact:
            return carry
        return carry, (out[-1].permute(0, 3, 1, 2) if nhwc else out[-1])

    def head_forward(self, h, return_map=False):
        sp = self._split
        if sp.map_problem:
            if return_map:
                raise LakdError(sp.map_problem)
            return sp.pieces[-1](*h.values)[0]
        logits, fmap, emb = sp.pieces[-1](*h.values)
        if sp.nhwc:
            fmap = fmap.permute(0, 3, 1, 2)
        if emb.dim() > 2:
            emb = torch.flatten(emb, 1)
        return (logits, fmap, emb) if return_map else logits

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
        sp = self._split
        if sp.cam_problem:
            raise LakdError(sp.cam_problem)
        w = self.classifier.weight
        if sp.mid is None:
            return torch.einsum("bchw,kc->bkhw", fmap, w)
        # the layers between pooling and the classifier applied at every position of the map
        b, c, hh, ww = fmap.shape
        x = fmap.permute(0, 2, 3, 1).reshape(b * hh * ww, c)
        if len(sp.pool_shape) == 4:  # the layers after pooling take the pooled map's own 4-D shape
            x = x[:, None, None, :] if sp.nhwc else x[:, :, None, None]
        (e,) = sp.mid(x)
        return torch.einsum("bhwc,kc->bkhw", e.reshape(b, hh, ww, -1), w)

    def missing(self, need):
        if self._split.map_problem and need in ("features", "class_maps", "preact"):
            return self._split.map_problem
        if need == "class_maps":
            return self._split.cam_problem
        return super().missing(need)

    def forward(self, x, features=False, preact=False, blocks=False):
        return FeatureNet.forward(self, x, features=features, preact=preact, blocks=blocks)


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


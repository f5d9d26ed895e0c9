"""``lakd models``, ``lakd methods``, ``lakd configs``: what ships."""
from __future__ import annotations

import argparse
import textwrap

from ..registry import first_sentences  # noqa: F401  (re-exported: how listings summarise a docstring)

HELPS = {
    "models": "list the model zoo (name, family, parameters, stage shapes), or with --blocks NAME the cut points "
              "of any model (torchvision:/timm:/module: names included) with their output shapes",
    "methods": "list the distillation methods and their config sections",
    "configs": "list the shipped experiment configs",
}
HELP = HELPS["models"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", metavar="NAME", default=None,
                   help="list the cut points of model NAME (e.g. torchvision:resnet18, timm:convnext_atto, "
                        "module:mynets:student) with their output shapes, for model.blocks")
    p.add_argument("--image-size", type=int, default=None, help="input size for the shapes (default 224; 32 for "
                                                                 "module: names and the CIFAR zoo)")
    p.add_argument("--num-classes", type=int, default=10)


def add_arguments_configs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="list another configs folder (default: the shipped configs)")


def run_blocks(name: str, size: int | None, num_classes: int) -> int:
    """Cut candidates of ``name`` in run order with output shapes; the default cut points marked."""
    from ..models import adapt, create_model, cut_candidates, is_external
    from ..models.external import build_network, default_input_size

    if not is_external(name):
        m = create_model(name, num_classes)
        size = size or m.input_size
        info = m.feature_info(size)
        print(f"{name}: {m.num_blocks} blocks (the zoo cuts by index: sdm.splits=[...]); outputs at {size}x{size}, "
              f"stage ends {m.stage_ends}")
        for i, b in enumerate(info["blocks"]):
            print(f"  {i + 1:>3}  {b.channels}x{b.height}x{b.width}{'  (stage end)' if i + 1 in m.stage_ends else ''}")
        return 0
    size = size or default_input_size(name)
    net = build_network(name, num_classes)
    rows = cut_candidates(net, size)
    adapted = adapt(net, input_size=size, name=name)
    stem, blocks = adapted.cut_names["stem"], adapted.cut_names["blocks"]
    print(f"cut points of {name} at {size}x{size} (module paths in run order, output shape); "
          f"S = default stem, B = default block ends")
    for path, shape in rows:
        mark = "S" if path == stem else "B" if path in blocks else " "
        depth = path.count(".")
        shp = "x".join(str(d) for d in shape[1:]) if shape else "-"
        print(f"{mark} {'  ' * depth}{path:<{max(40 - 2 * depth, 8)}} {shp}")
    print(f"default: model.stem={stem} model.blocks=[{','.join(blocks)}] (stage ends {adapted.stage_ends}; "
          f"classifier {adapted._split.classifier_path or 'none'})")
    if adapted._split.nhwc:
        print("maps are H x W x C here (final pooling over dims 1, 2): the distillers see every cut but the input "
              "as C x H x W")
    tokens = [t for t in adapted._split.token_cuts if t is not None]
    if tokens:
        p, h, w = tokens[-1]
        print(f"blocks are token sequences here ({p} class/distillation token(s), then {h} x {w} patch tokens): the "
              f"distillers see each as its C x {h} x {w} patch grid, the leading tokens apart")
    return 0


def run_models(args) -> int:
    from ..models import FAMILY, create_model, list_models

    if args.blocks:
        return run_blocks(args.blocks, args.image_size, args.num_classes)

    print(f"{'name':<12} {'family':<9} {'params':>9}  blocks  stage outputs (C x H x W)")
    for name in list_models():
        m = create_model(name, 100 if FAMILY[name] == "cifar" else 1000)
        n = sum(p.numel() for p in m.parameters())
        info = m.feature_info()
        stages = ", ".join(f"{s.channels}x{s.height}x{s.width}" for s in info["stages"])
        print(f"{name:<12} {FAMILY[name]:<9} {n / 1e6:>8.2f}M  {m.num_blocks:>6}  {stages}")
    return 0


def run_methods(args) -> int:
    from ..registry import DISTILLERS

    indent = " " * 9
    light = DISTILLERS.light()  # the methods' catalog: no torch import
    if light is None:
        from ..distillers.catalog import build

        light = build()["entries"]
    for name, entry in light.items():
        text = textwrap.fill(entry["summary"], width=110, initial_indent=f"{name:<8} ",
                             subsequent_indent=indent, break_on_hyphens=False)
        sections = ", ".join(f"{k}: {v}" for k, v in entry["defaults"].items()) or "-"
        print(text or name)
        print(textwrap.fill(sections, width=110, initial_indent=indent, subsequent_indent=indent + "  ",
                            break_on_hyphens=False))
        if entry["variants"]:
            print(textwrap.fill("variants: " + "; ".join(f"{v} = {' '.join(o)}" for v, o in entry["variants"].items()),
                                width=110, initial_indent=indent, subsequent_indent=indent + "  ",
                                break_on_hyphens=False))
    return 0


def run_configs(args) -> int:
    from ..config import shipped_config_names, shipped_configs_dir

    root = args.root or shipped_configs_dir()
    names = shipped_config_names(root)
    if not names:
        print(f"no configs under {root!r}")
        return 0
    print(f"# {len(names)} configs under {root}; run one by name from any folder: lakd train NAME [key=value ...]")
    print("# the second column: the recipe it trains with (paper: the LAKD paper's; ref: the reference's own, "
          "configs/_references.yaml)")
    cache: dict = {}
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {recipe_label(_config_file(root, name), cache)}")
    return 0


def _config_file(root: str, name: str) -> str:
    import os

    path = os.path.join(root, name + ".yaml")
    return path if os.path.exists(path) else os.path.join(root, name + ".yml")


def recipe_label(path: str, cache: dict | None = None) -> str:
    """The recipe a config trains with, for ``lakd configs``: ``ref: <name>@<commit>`` for a reference-recipe
    config (its ``reference`` entry), ``paper`` for the LAKD paper's (a ``_base_`` chain through
    ``_recipe_paper*.yaml``), the name of another ``_recipe_<name>.yaml`` it inherits, else ``-``."""
    import os

    import yaml

    from ..config import resolve_base

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # only _base_ and reference are read: the C parser
    cache = {} if cache is None else cache
    ref, ref_seen, recipe, seen = None, False, None, set()
    while path and path not in seen:
        seen.add(path)
        if path not in cache:
            try:
                with open(path, encoding="utf-8") as f:
                    cache[path] = yaml.load(f, Loader=loader) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                cache[path] = None
        data = cache[path]
        if not isinstance(data, dict):
            return "?"
        if not ref_seen and "reference" in data:  # the nearest file that sets it wins (null clears it)
            ref, ref_seen = data["reference"], True
        name = os.path.splitext(os.path.basename(path))[0]
        if recipe is None and name.startswith("_recipe_"):
            recipe = "paper" if name.startswith("_recipe_paper") else name[len("_recipe_"):]
        base = data.get("_base_")
        path = resolve_base(base, path) if isinstance(base, str) else None
    if isinstance(ref, dict) and ref.get("repository"):
        return f"ref: {str(ref['repository']).rsplit('/', 1)[-1]}@{str(ref.get('commit') or '?')[:7]}"
    return recipe or "-"


run = run_models

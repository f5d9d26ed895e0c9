"""``catalog.json``: what every registered method declares as plain data, for the layers that must not import torch.

``lakd --help``, a config with a misspelt key or an unknown method, and ``lakd methods`` answer in a fraction of a
second when they need not import torch (about 3-4 s on a small machine). The config layer learns the methods' own
sections through the method registry (``lakd.registry.DISTILLERS``), which would import this package and torch with
it; it reads this catalog instead while the package is not imported (``Registry.light``). The catalog is generated
from the classes, never edited by hand::

    python -m lakd.distillers.catalog          # rewrite lakd/distillers/catalog.json
    python -m lakd.distillers.catalog --check  # exit 1 if it is stale (tests/test_catalog.py does the same)

A method registered at run time (``register_distiller`` in one's own code) imports this package first, so the
live classes are asked from then on and the catalog never hides it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..registry import first_sentences
from . import DISTILLERS, Distiller

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalog.json")


def summary(cls: type[Distiller]) -> str:
    """The first sentence of the class docstring (else its module's), as ``lakd methods`` prints it."""
    return first_sentences(cls.__doc__ or sys.modules[cls.__module__].__doc__ or "")


def build() -> dict[str, Any]:
    entries = {}
    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        entries[name] = {
            "summary": summary(cls),
            "display_name": cls.display_name or name,
            "defaults": cls.DEFAULTS,
            "needs_teacher": bool(cls.needs_teacher),
            # a setting decides whether a run uses a teacher (Tf-KD's tfkd.mode): the config layer then asks the class
            "teacher_depends_on_settings": cls.uses_teacher.__func__ is not Distiller.uses_teacher.__func__,
            "variants": {k: list(v) for k, v in cls.variants.items()},
            "settings": getattr(cls, "SETTINGS", None),
            "checks": getattr(cls, "CHECKS", None),
        }
    return {"generated_by": "python -m lakd.distillers.catalog", "entries": entries}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lakd.distillers.catalog", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when catalog.json differs from the classes")
    args = p.parse_args(argv)
    text = render(build())
    try:
        with open(PATH, encoding="utf-8") as f:
            current = f.read()
    except OSError:
        current = ""
    if args.check:
        if current != text:
            print(f"{PATH} is stale: run `python -m lakd.distillers.catalog`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        with open(PATH, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {PATH} ({len(json.loads(text)['entries'])} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

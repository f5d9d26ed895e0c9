"""Checking a method's settings against what its class declares: plain data, no torch.

Every distiller declares, next to its ``DEFAULTS``, the kind and range of each of its settings (``SETTINGS``) and
the checks that involve several settings, or a setting and a fact of the run (``CHECKS``). Both are plain,
JSON-serialisable data (strings, numbers, lists, dicts), so that they can be read, listed and checked without
importing the method (or torch); this module is the one place that reads them, and the one place where a method's
setting is refused. ``lakd.config.load_config`` runs it before anything is built, the engine again once the
training set is known (``@train_size``), and ``Distiller.__init__`` for distillers built by hand
(``lakd.distiller``).

``SETTINGS`` maps ``"section.key"`` to a spec::

    {"kind": "number", "gt": 0, "about": "the temperature"}

- ``kind``: ``number`` (a finite int or float), ``int`` (a whole number), ``bool``, ``choice`` (one of
  ``choices``), ``numbers`` / ``ints`` (a list of those), ``text`` (a non-empty string: a name or a path);
- bounds (numbers, and each element of a list): ``ge``, ``gt``, ``le``, ``lt``; ``odd: true`` (ints);
- lists: ``nonempty: true``, ``increasing: true`` (strictly);
- ``null: true``: null (None) is allowed too; ``also``: other literal values allowed too (e.g. ``["auto"]``);
- ``about``: a few words on what the setting is (shown in the error); ``example``: a valid value for the error
  (default: the method's default).

NaN and infinity are refused for every ``number`` and ``numbers`` setting (``value < 0`` is False for NaN, so a
range test alone lets it through).

``CHECKS`` is a list of rules:

- ``{"rule": "not_all_zero", "keys": [...], "about": ...}``: at least one of these loss weights is non-zero (an
  entry may be ``[key, fallback]``: the fallback's value counts when the key is null; a list value counts as zero
  when all of its elements are);
- ``{"rule": "compare", "key": K, "op": "<=", "than": X, "about": ...}``: ``K op X`` with ``op`` one of ``<``,
  ``<=``, ``>``, ``>=``, and ``X`` a number, another setting (``solver.epochs``) or a fact of the run:
  ``@train_size`` (the training images, known once the data are) or ``@smallest_batch`` (the fewest images a
  process trains a step on: ``solver.batch_size`` over the processes, or the epoch's partial last batch, see
  ``run_facts``). A rule whose values are not known (yet) is not checked.

A rule may carry ``"when": {"key": value, ...}``: it applies only when those settings have those values, and
``"waivable": true`` (compare rules) where breaking it is a choice a study may make on purpose (a loss warm-up
longer than a short run: the loss reaches part of its weight) rather than a run that cannot work: a config whose
``waive`` list names the rule's key then runs with a logged warning.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

from .errors import LakdError

KINDS = ("number", "int", "bool", "choice", "numbers", "ints", "text")
RULE_KEYS = {"rule", "keys", "key", "op", "than", "about", "when", "example", "waivable"}
SPEC_KEYS = {"kind", "ge", "gt", "le", "lt", "odd", "nonempty", "increasing", "null", "also", "choices", "about",
             "example"}
RULES = ("not_all_zero", "compare")
OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
#: facts of a run a rule may compare with (``than``); unknown until the run gives them
FACTS = ("@train_size", "@smallest_batch")

_MISSING = object()
log = logging.getLogger(__name__)
_WAIVED_SAID: set[str] = set()  # the waived-rule warnings given in this process


# ----- reading values ----------------------------------------------------------------------------------------
def lookup(cfg: dict, key: str, defaults: dict | None = None) -> Any:
    """The value of ``section.key`` in ``cfg``, else in ``defaults``; ``_MISSING`` when neither has it."""
    for source in (cfg, defaults or {}):
        node: Any = source
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is not _MISSING:
            return node
    return _MISSING


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


# ----- one setting --------------------------------------------------------------------------------------------
def describe(spec: dict) -> str:
    """What a spec allows, in words: ``a finite number > 0``, ``a whole number >= 1``, ``one of reg, self``..."""
    kind = spec["kind"]
    bounds = " and ".join(f"{op} {_fmt(spec[k])}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                          if k in spec)
    if kind == "number":
        text = "a finite number" + (f" {bounds}" if bounds else "")
    elif kind == "int":
        text = ("an odd whole number" if spec.get("odd") else "a whole number") + (f" {bounds}" if bounds else "")
    elif kind == "bool":
        text = "true or false"
    elif kind == "choice":
        text = "one of " + ", ".join(_fmt(c) for c in spec["choices"])
    elif kind == "text":
        text = "a non-empty string"
    else:
        element = "finite numbers" if kind == "numbers" else "whole numbers"
        text = ("a non-empty list of " if spec.get("nonempty") else "a list of ") + element \
            + (f" {bounds}" if bounds else "") + (", increasing" if spec.get("increasing") else "")
    extra = [_fmt(v) for v in spec.get("also", [])] + (["null"] if spec.get("null") else [])
    return text + "".join(f" or {e}" for e in extra)


def _scalar_ok(spec: dict, kind: str, v: Any) -> bool:
    if kind == "number":
        if not _is_number(v) or not math.isfinite(v):
            return False
    elif kind == "int":
        if not _is_int(v) or (spec.get("odd") and v % 2 == 0):
            return False
    for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if k in spec and not OPS[op](v, spec[k]):
            return False
    return True


def value_ok(spec: dict, v: Any) -> bool:
    """Whether ``v`` is allowed by ``spec``."""
    if v is None and spec.get("null"):
        return True
    if "also" in spec and any(v == a and type(v) is type(a) for a in spec["also"]):
        return True
    kind = spec["kind"]
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "choice":
        return any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in spec["choices"])
    if kind == "text":
        return isinstance(v, str) and bool(v.strip())
    if kind in ("number", "int"):
        return _scalar_ok(spec, kind, v)
    if not isinstance(v, list) or (spec.get("nonempty") and not v):
        return False
    element = "number" if kind == "numbers" else "int"
    if not all(_scalar_ok(spec, element, x) for x in v):
        return False
    return not spec.get("increasing") or all(a < b for a, b in zip(v, v[1:]))


def check_value(key: str, spec: dict, v: Any, example: Any = _MISSING) -> None:
    """Refuse ``v`` for ``key`` unless ``spec`` allows it: one line naming the key, the value, what is allowed
    and a working example."""
    if value_ok(spec, v):
        return
    about = f" ({spec['about']})" if spec.get("about") else ""
    ex = spec.get("example", example)
    hint = f"; e.g. {key}={_fmt(ex)}" if ex is not _MISSING and value_ok(spec, ex) else ""
    raise LakdError(f"{key}{about} must be {describe(spec)}, got {_fmt(v) if _is_number(v) else repr(v)}{hint}")


# ----- rules over several settings ----------------------------------------------------------------------------
def _zero(v: Any) -> bool:
    if isinstance(v, list):
        return all(_is_number(x) and x == 0 for x in v)
    return _is_number(v) and v == 0


def _applies(rule: dict, cfg: dict, defaults: dict) -> bool:
    return all(lookup(cfg, k, defaults) == want for k, want in (rule.get("when") or {}).items())


def _operand(x: Any, cfg: dict, defaults: dict, facts: dict) -> tuple[Any, str]:
    """A rule's ``than``: (value, how the message names it); value ``_MISSING`` when not known."""
    if isinstance(x, str) and x.startswith("@"):
        v, words = facts.get(x, (_MISSING, x))[:2]
        return v, words
    if isinstance(x, str):
        v = lookup(cfg, x, defaults)
        return v, f"{x}={_fmt(v)}"
    return x, _fmt(x)


def check_rule(rule: dict, cfg: dict, defaults: dict, facts: dict, method: str = "") -> None:
    """Raise ``LakdError`` when ``cfg`` breaks ``rule``; a ``waivable`` compare rule whose key the config's
    ``waive`` list names logs a warning instead."""
    if not _applies(rule, cfg, defaults):
        return
    about = f" ({rule['about']})" if rule.get("about") else ""
    if rule["rule"] == "not_all_zero":
        shown, values = [], []
        for entry in rule["keys"]:
            key, fallback = (entry, None) if isinstance(entry, str) else entry
            v = lookup(cfg, key, defaults)
            if v is None and fallback:
                key, v = fallback, lookup(cfg, fallback, defaults)
            if v is _MISSING:
                return
            shown.append(f"{key}={_fmt(v)}")
            values.append(v)
        if all(_zero(v) for v in values):
            first = rule["keys"][0] if isinstance(rule["keys"][0], str) else rule["keys"][0][0]
            raise LakdError(f"every loss weight of {method or 'the method'} is 0 ({', '.join(shown)}): the run would "
                            f"train nothing{about}; set at least one above 0, e.g. {first}=1.0")
    elif rule["rule"] == "compare":
        op = rule["op"]
        v, left = _operand(rule["key"], cfg, defaults, facts)
        other, right = _operand(rule["than"], cfg, defaults, facts)
        if v is _MISSING or other is _MISSING or not _is_number(v) or not _is_number(other):
            return
        if OPS[op](v, other):
            return
        key = rule["key"]
        if rule.get("waivable") and key in (cfg.get("waive") or ()):
            said = f"{left} is not {op} {right}{about}: run on purpose (waive=[{key}])"
            if said not in _WAIVED_SAID:  # once per process: the config, the engine and the distiller all check
                _WAIVED_SAID.add(said)
                log.warning(said)
            return
        fix = {"<=": other, ">=": other, "<": other - 1 if _is_int(v) else None,
               ">": other + 1 if _is_int(v) else None}[op]
        if rule.get("example"):
            hint = f"; e.g. {rule['example']}"
        elif key.startswith("@") and len(facts.get(key, ())) > 2:  # the fact knows what to change
            hint = f"; e.g. {facts[key][2](other)}"
        elif fix is not None and not key.startswith("@"):
            hint = f"; e.g. {key}={_fmt(fix)}"
        else:
            hint = ""
        if rule.get("waivable"):
            hint += f" (or waive=[{key}] to run it so on purpose)"
        raise LakdError(f"{left} must be {op} {right}{' for ' + method if method else ''}{about}{hint}")


# ----- a method's declarations --------------------------------------------------------------------------------
def check_settings(cfg: dict, settings: dict, checks: list, defaults: dict, facts: dict | None = None,
                   method: str = "", rules: bool = True) -> None:
    """Check ``cfg`` against one method's ``SETTINGS`` (every declared key, ``defaults`` filling the keys ``cfg``
    lacks) and, with ``rules``, its ``CHECKS`` given the run's ``facts`` (``@train_size``, ...)."""
    for key, spec in settings.items():
        v = lookup(cfg, key, defaults)
        if v is not _MISSING:
            check_value(key, spec, v, lookup(defaults, key))
    if rules:
        for rule in checks:
            check_rule(rule, cfg, defaults, facts or {}, method)


def run_facts(cfg: dict, train_size: int | None = None, world_size: int | None = None) -> dict:
    """The facts rules compare with, ``{name: (value, how an error names it[, a fix given the rule's bound])}``:

    - ``@train_size``: the training images (only when ``train_size`` is given: the data are known);
    - ``@smallest_batch``: the fewest images a process trains a step on: ``solver.batch_size`` over the processes
      (``world_size``, else ``$WORLD_SIZE``, else 1) and, once the data are known, the epoch's last batch when it is
      partial (one process runs it; several processes drop it: ``lakd.data.sampling``)."""
    facts: dict[str, tuple] = {}
    batch = lookup(cfg, "solver.batch_size")
    try:
        world = max(int(world_size or os.environ.get("WORLD_SIZE") or 1), 1)
    except ValueError:
        world = 1
    if train_size:
        facts["@train_size"] = (int(train_size), f"the training set's {int(train_size)} images")
    if not _is_int(batch) or batch < 1:
        return facts
    per = max(batch // world, 1)
    facts["@smallest_batch"] = (
        per, f"the batch per process (solver.batch_size={batch} over {world} processes: {per})" if world > 1
        else f"the batch (solver.batch_size={batch})",
        lambda need: f"solver.batch_size={max(64, need) * world}")
    steps = lookup(cfg, "solver.max_steps_per_epoch")
    if train_size and world == 1 and train_size % batch and train_size % batch < per \
            and not (_is_int(steps) and 0 < steps <= train_size // batch):  # the partial last batch is trained
        last = train_size % batch

        def fix(need: int, n: int = int(train_size)) -> str:
            ok = next((b for b in range(batch - 1, need - 1, -1) if n % b == 0 or n % b >= need), None)
            keep = n - n % batch
            return " or ".join(([f"solver.batch_size={ok}"] if ok else [])
                               + ([f"data.train_subset={keep}"] if keep >= batch else []))

        facts["@smallest_batch"] = (
            last, f"the epoch's last batch ({train_size} training images in batches of {batch} leave {last})", fix)
    return facts


def fitting_values(checks: list, known: dict) -> dict:
    """Values that meet a method's ``compare`` rules whose bound is in ``known`` (a setting such as
    ``solver.epochs`` or a fact such as ``@train_size``, by value): the bound itself for ``<=``/``>=``, one past it
    for ``<``/``>``. For short runs made on purpose (smoke tests, benchmarks): ``{"dkd.warmup": 2}`` for 2
    epochs, ``{"crd.nce_k": 127}`` for 128 images."""
    out = {}
    for rule in checks:
        if rule.get("rule") != "compare" or rule["key"].startswith("@") or not isinstance(rule["than"], str):
            continue
        bound = known.get(rule["than"])
        if _is_number(bound):
            out[rule["key"]] = {"<=": bound, ">=": bound, "<": bound - 1, ">": bound + 1}[rule["op"]]
    return out


def check_declarations(owner: str, defaults: dict, settings: dict, checks: list) -> list[str]:
    """Problems in a method's declarations themselves (for the tests and the catalog): unknown kinds or spec
    keys, keys without a default, rules naming unknown operators. ``[]`` when they are sound."""
    flat = {f"{s}.{k}" for s, sec in defaults.items() if isinstance(sec, dict) for k in sec}
    out = []
    for key, spec in settings.items():
        if key not in flat:
            out.append(f"{owner}: SETTINGS names {key!r}, which is not in DEFAULTS")
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            out.append(f"{owner}: {key}: kind must be one of {', '.join(KINDS)}")
            continue
        if set(spec) - SPEC_KEYS:
            out.append(f"{owner}: {key}: unknown spec keys {sorted(set(spec) - SPEC_KEYS)}")
        if spec["kind"] == "choice" and not spec.get("choices"):
            out.append(f"{owner}: {key}: a choice needs choices")
        default = lookup(defaults, key)
        if default is not _MISSING and not value_ok(spec, default):
            out.append(f"{owner}: {key}: the default {default!r} is not allowed by its own spec")
    for rule in checks:
        if not isinstance(rule, dict) or rule.get("rule") not in RULES:
            out.append(f"{owner}: CHECKS: rule must be one of {', '.join(RULES)}, got {rule!r}")
        elif rule["rule"] == "compare" and rule.get("op") not in OPS:
            out.append(f"{owner}: CHECKS: op must be one of {', '.join(OPS)}, got {rule.get('op')!r}")
        elif set(rule) - RULE_KEYS:
            out.append(f"{owner}: CHECKS: unknown rule keys {sorted(set(rule) - RULE_KEYS)}")
        else:
            named = [rule["key"]] if rule["rule"] == "compare" else \
                [k for e in rule.get("keys", []) for k in ([e] if isinstance(e, str) else e)]
            if rule["rule"] == "compare" and isinstance(rule.get("than"), str):
                named.append(rule["than"])
            for k in named:
                if k.startswith("@") and k not in FACTS:
                    out.append(f"{owner}: CHECKS: unknown fact {k!r} (known: {', '.join(FACTS)})")
                elif not k.startswith("@") and "." not in k:
                    out.append(f"{owner}: CHECKS: {k!r} is neither a section.key setting nor a fact")
    return out


def check_finite(cfg: dict, prefix: str = "", skip: tuple[str, ...] = ("model.kwargs", "teacher.kwargs")) -> None:
    """Refuse NaN and infinity anywhere in a config (lists included), except under ``skip`` (constructor
    arguments, which belong to the user's models): one line naming the key."""
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if key in skip:
            continue
        if isinstance(v, dict):
            check_finite(v, f"{key}.", skip)
        else:
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, float) and not math.isfinite(x):
                    raise LakdError(f"{key} must be finite, got {_fmt(v)} (NaN and infinity are never a valid "
                                    f"setting)")

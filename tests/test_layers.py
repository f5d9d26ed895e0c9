"""The package's import graph: layers that point one way and no import cycle between any two files.

Every ``import`` statement of every file under ``lakd/`` (module level and inside functions alike) is read with
``ast`` and resolved to the file it loads. Layers, bottom to top:

    runtime/, errors.py, registry.py  <  config.py  <  models/, data/, distillers/  <  engine/  <  sweep/
    <  analysis/, cli/

models, data and distillers import nothing from engine, sweep, analysis or cli; engine nothing from sweep,
analysis or cli; sweep nothing from analysis or cli; runtime nothing but ``lakd.errors``.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lakd"

#: top-level part of the package -> the parts it must not import
FORBIDDEN = {
    "runtime": {"config", "registry", "models", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "errors": {"runtime", "config", "registry", "models", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "registry": {"runtime", "config", "models", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "config": {"models", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "models": {"config", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "data": {"config", "models", "distillers", "engine", "sweep", "analysis", "cli"},
    "distillers": {"config", "data", "engine", "sweep", "analysis", "cli"},
    "settings": {"runtime", "config", "registry", "models", "data", "distillers", "engine", "sweep", "analysis", "cli"},
    "engine": {"sweep", "analysis", "cli"},
    "sweep": {"analysis", "cli"},
    "analysis": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = ["lakd", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ``lakd`` modules (files) ``path`` imports."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lakd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lakd":
                continue
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            out |= subs
            if len(subs) < len(node.names):  # some names are attributes of ``mod`` itself
                out.add(mod)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read():
    g = _graph()
    assert "lakd.engine.trainer" in g and "lakd.runtime.distributed" in g
    assert "lakd.engine.build" in g["lakd.engine.trainer"]
    assert "lakd.runtime.distributed" in g["lakd.distillers.crd"]  # a relative `from ..runtime import distributed`
    assert "lakd.data.cifar" in g["lakd.data"]  # `from . import cifar` in a package __init__
    assert "lakd.engine.metrics" in g["lakd.sweep.runner"]  # the sweep reads metrics.jsonl with the engine's reader


def test_layers_point_one_way():
    bad = []
    for mod, targets in _graph().items():
        for t in targets:
            if _part(t) in FORBIDDEN.get(_part(mod), set()):
                bad.append(f"{mod} imports {t}")
    assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = _graph()
    # Tarjan's strongly connected components: any component of two or more files is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _method_knowledge(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Places that branch on a method's name or keep a list of methods: a comparison with a method name
    (``method == "lakd"``, ``m in ("kd", "dkd")``), a lookup by one (``x["crd"]``, ``x.get("scratch")``), a
    table keyed by method names, a literal holding two or more method names, or a string listing them (``"scratch,kd,fitnet"``). A method
    name as a plain value (a config default, a run recipe's ``method=kd``) is data, not method knowledge."""

    def is_name(n) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [(node.lineno, f"compares with {e.value!r}") for e in elts if is_name(e)]
        elif isinstance(node, ast.Subscript) and is_name(node.slice):
            found.append((node.lineno, f"looks up {node.slice.value!r}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and is_name(node.args[0])):
            found.append((node.lineno, f"looks up {node.args[0].value!r}"))
        elif isinstance(node, ast.Dict) and any(is_name(k) for k in node.keys):
            found.append((node.lineno, f"a table keyed by {[k.value for k in node.keys if is_name(k)]}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            listed = {e.value for e in node.elts if is_name(e)}
            if len(listed) > 1:
                found.append((node.lineno, f"lists methods {sorted(listed)}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "," in node.value:
            listed = {p.strip() for p in node.value.split(",")} & names
            if len(listed) > 1:
                found.append((node.lineno, f"lists methods {sorted(listed)}"))
    return found


def test_method_knowledge_detector_sees_the_old_code():
    names = {"scratch", "kd", "lakd", "lakd_joint"}
    old = ('if cfg.get("method") == "lakd": pass\n'
           'ALIASES = {"lakd_joint": ("lakd", [])}\n'
           'ORDER = ["scratch", "kd", "lakd"]\n'
           'ALL = "scratch,kd,lakd"\n'
           'ref = results.get("scratch")\n'
           'if m != "lakd_joint": pass\n')
    assert len(_method_knowledge(ast.parse(old), names)) == 6
    fine = 'DEFAULTS = {"method": "scratch"}\nSTAGES = [("kd", "kd", "student", [])]\nlog = getLogger("lakd")\n'
    assert _method_knowledge(ast.parse(fine), names) == []


def test_nothing_outside_the_distillers_names_a_method():
    """No code outside lakd/distillers/ branches on a method's name, keeps a list of methods or imports a
    method's own module: what a report, benchmark or analysis needs is declared on the method classes."""
    from lakd.distillers import method_variants

    names = set(method_variants())
    bad = []
    for name, path in _modules().items():
        if _part(name) == "distillers":
            continue
        for line, what in _method_knowledge(ast.parse(path.read_text(), str(path)), names):
            bad.append(f"{name}:{line} {what}")
    for mod, targets in _graph().items():
        if _part(mod) != "distillers":
            bad += [f"{mod} imports {t}" for t in targets if t.startswith("lakd.distillers.")
                    and t.split(".")[-1] in names]
    assert not bad, "method knowledge outside lakd/distillers/:\n" + "\n".join(sorted(bad))

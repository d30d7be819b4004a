"""The package's layering holds: what each module of ``src/opd`` may import.

Three rules, read from the source with :mod:`ast` (every ``import`` and ``from ... import``
anywhere in a file, function bodies included; relative imports resolved; ``from opd import
x`` with ``x`` a submodule counts as importing ``opd.x``):

(a) no module imports a higher layer than its own (``LAYERS`` below, low to high; a module
    belongs to the layer of its longest matching prefix, and every module has one);
(b) no import cycle between ``opd.*`` modules;
(c) at most ``MAX_TOP_LEVEL_FILES`` Python files at the top of ``src/opd/``.

``LAYERS`` is the one written copy of the order; docs/ARCHITECTURE.md explains it. The
checks are pure functions of ``{module: [(imported module, line), ...]}``; reading the files
is separate (:func:`read_imports`), and a self-test feeds the checks a synthetic package.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

ROOT = "opd"
SRC = Path(__file__).resolve().parents[1] / "src"
MAX_TOP_LEVEL_FILES = 6

# Low to high. A module may import its own layer or a lower one. ROOT matches only itself.
LAYERS: list[tuple[str, ...]] = [
    ("opd.errors", "opd.batch", "opd.report"),  # foundation
    ("opd.losses",),
    ("opd.signals",),
    ("opd.tasks",),
    ("opd.models",),
    ("opd.rollouts",),
    ("opd.methods",),
    ("opd.config",),
    ("opd.run",),
    ("opd.testbed",),
    ("opd.diagnostics",),
    ("opd.compare",),
    ("opd.cli", "opd.__main__", ROOT),  # app
]

FIX = "move {target} down, or inject it from above as a callback/registry entry"

Imports = dict[str, list[tuple[str, int]]]


# ---- reading the files ----------------------------------------------------------------


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(src: Path = SRC, root: str = ROOT) -> dict[str, Path]:
    """``{module: file}`` for every Python file of the package."""
    return {module_name(p, src): p for p in sorted((src / root).rglob("*.py"))}


def _base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from X import ...`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = _base(node, module, is_package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def file_imports(path: Path, module: str, known: set[str], root: str = ROOT) -> list[tuple[str, int]]:
    """Every ``root.*`` module ``path`` imports, with the line, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = [(name, node.lineno) for node in ast.walk(tree) for name in _imported(node, module, is_package, known)]
    return sorted({(n, line) for n, line in found if n == root or n.startswith(root + ".")}, key=lambda x: (x[1], x[0]))


def read_imports(src: Path = SRC, root: str = ROOT) -> tuple[Imports, dict[str, str]]:
    """``{module: [(imported module, line), ...]}`` and ``{module: file shown in messages}``."""
    files = module_files(src, root)
    imports = {m: file_imports(p, m, set(files), root) for m, p in files.items()}
    shown = {m: str(p.relative_to(src.parent)) if src.parent in p.parents else str(p) for m, p in files.items()}
    return imports, shown


# ---- the checks (pure) -----------------------------------------------------------------


def layer_of(module: str, layers=LAYERS, root: str = ROOT) -> int | None:
    """Index of the layer of ``module``'s longest matching prefix (``root`` matches only itself)."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(layers):
        for p in prefixes:
            hit = module == p or (p != root and module.startswith(p + "."))
            if hit and (best is None or len(p) > best[0]):
                best = (len(p), index)
    return None if best is None else best[1]


def _layer_name(index: int, layers=LAYERS) -> str:
    return f"layer {index + 1} ({', '.join(layers[index])})"


def unlayered(modules, layers=LAYERS, root: str = ROOT, paths: dict | None = None) -> list[str]:
    """A message for every module that belongs to no layer."""
    return [
        f"{(paths or {}).get(m, m)}: module {m} belongs to no layer; add it to the layer order "
        f"(LAYERS in tests/test_layers.py) and to docs/ARCHITECTURE.md"
        for m in sorted(modules) if layer_of(m, layers, root) is None
    ]


def upward_imports(imports: Imports, layers=LAYERS, root: str = ROOT, paths: dict | None = None) -> list[str]:
    """A message for every import from a lower layer to a higher one."""
    out = []
    for module, found in sorted(imports.items()):
        own = layer_of(module, layers, root)
        for target, line in found:
            theirs = layer_of(target, layers, root)
            if own is not None and theirs is not None and theirs > own:
                out.append(
                    f"{(paths or {}).get(module, module)}:{line}: {module} ({_layer_name(own, layers)}) imports "
                    f"{target} ({_layer_name(theirs, layers)}), a higher layer; " + FIX.format(target=target)
                )
    return out


def _graph(imports: Imports) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over the modules in ``imports``, no self-loops."""
    graph: dict[str, dict[str, int]] = {m: {} for m in imports}
    for module, found in imports.items():
        for target, line in found:
            if target in imports and target != module:
                graph[module].setdefault(target, line)
    return graph


def _cycle_from(start: str, graph: dict[str, dict[str, int]]) -> list[str] | None:
    """A shortest cycle through ``start`` (breadth-first), as ``[start, ..., start]``."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parent[chain[-1]])
                    return chain[::-1] + [start]
                if target not in parent:
                    parent[target] = node
                    nxt.append(target)
        frontier = nxt
    return None


def import_cycles(imports: Imports) -> list[list[str]]:
    """One chain ``[a, b, ..., a]`` per distinct cycle found, each through its least module."""
    graph, cycles, seen = _graph(imports), [], set()
    for module in sorted(graph):
        cycle = _cycle_from(module, graph)
        if cycle and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            cycles.append(cycle)
    return cycles


def cycle_message(cycle: list[str], imports: Imports, paths: dict | None = None) -> str:
    graph = _graph(imports)
    edges = "; ".join(f"{(paths or {}).get(a, a)}:{graph[a][b]} imports {b}" for a, b in pairwise(cycle))
    return f"import cycle {' -> '.join(cycle)} ({edges}); in one of these, " + FIX.format(target="the shared part")


def top_level_excess(files: list[str], limit: int = MAX_TOP_LEVEL_FILES) -> list[str]:
    """A message when the package's top folder holds more than ``limit`` Python files."""
    if len(files) <= limit:
        return []
    listed = ", ".join(sorted(files))
    return [f"src/{ROOT}/ holds {len(files)} Python files ({listed}), at most {limit} allowed; move modules into their layer folder"]


# ---- the real tree ---------------------------------------------------------------------


def _report(problems: list[str]) -> str:
    return "\n" + "\n".join(f"  - {p}" for p in problems) + "\n(see docs/ARCHITECTURE.md)"


def test_every_module_belongs_to_a_layer():
    imports, paths = read_imports()
    problems = unlayered(imports, paths=paths)
    assert not problems, _report(problems)


def test_no_import_goes_up_a_layer():
    imports, paths = read_imports()
    problems = upward_imports(imports, paths=paths)
    assert not problems, _report(problems)


def test_no_import_cycles():
    imports, paths = read_imports()
    problems = [cycle_message(c, imports, paths) for c in import_cycles(imports)]
    assert not problems, _report(problems)


def test_few_top_level_files():
    problems = top_level_excess([p.name for p in (SRC / ROOT).glob("*.py")])
    assert not problems, _report(problems)


# ---- the checks can fail ---------------------------------------------------------------

TOY_LAYERS = [("toy.low",), ("toy.high",), ("toy",)]


def test_checks_report_a_synthetic_upward_import_and_cycle():
    imports = {
        "toy.low.a": [("toy.low.b", 3), ("toy.high.c", 7)],  # upward, and one leg of a cycle
        "toy.low.b": [("toy.low.a", 2)],  # the cycle's other leg
        "toy.high.c": [],
        "toy.high.d": [("toy.low.b", 1)],  # downward: fine
        "toy.extra": [],  # in no layer
    }
    up = upward_imports(imports, TOY_LAYERS, root="toy")
    assert len(up) == 1 and "toy.low.a" in up[0] and ":7:" in up[0] and "toy.high.c" in up[0]
    assert "inject it from above" in up[0]
    assert import_cycles(imports) == [["toy.low.a", "toy.low.b", "toy.low.a"]]
    assert "toy.low.a -> toy.low.b -> toy.low.a" in cycle_message(import_cycles(imports)[0], imports)
    assert unlayered(imports, TOY_LAYERS, root="toy") and "toy.extra" in unlayered(imports, TOY_LAYERS, root="toy")[0]
    assert top_level_excess([f"m{i}.py" for i in range(7)]) and not top_level_excess(["a.py"])


def test_reader_finds_nested_and_relative_imports(tmp_path):
    (tmp_path / "toy" / "low").mkdir(parents=True)
    (tmp_path / "toy" / "high").mkdir()
    for pkg in ("toy", "toy/low", "toy/high"):
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "toy" / "low" / "a.py").write_text("def f():\n    from ..high import c\n    from . import b\n")
    (tmp_path / "toy" / "low" / "b.py").write_text("import toy.low.a\n")
    (tmp_path / "toy" / "high" / "c.py").write_text("")
    imports, paths = read_imports(tmp_path, root="toy")
    assert imports["toy.low.a"] == [("toy.high.c", 2), ("toy.low.b", 3)]
    up = upward_imports(imports, TOY_LAYERS, root="toy", paths=paths)
    assert len(up) == 1 and up[0].startswith(f"{paths['toy.low.a']}:2:")
    assert import_cycles(imports) == [["toy.low.a", "toy.low.b", "toy.low.a"]]

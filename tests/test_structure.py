"""The layout of ``custom/``: modules import each other in one direction, with no cycle, and at module level.

A cycle between two modules (``checkpoint`` and ``recipe`` once imported each other, one side hidden inside a
function) makes the import order matter and hides what depends on what; an import inside a function hides
it from the reader and from this check's first look. Every module is parsed with ``ast`` (nothing is
imported), and every ``import`` of a ``custom`` module counts, also inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

#: the packages of ``custom`` from the bottom up: each may import only itself and those before it
LAYERS = (
    "custom.utils",
    "custom.data",
    "custom.networks",
    "custom.engines",
    "custom.inference",
    "custom.segmentation",
    "custom.tools",
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def custom_imports(root: Path = REPO) -> list[tuple[str, str, int, bool, str]]:
    """``(importer, imported, line, inside a function, the line's text)`` for every import of a ``custom`` module.

    ``from custom.x import name`` counts as an import of ``custom.x.name`` when that is a module, else of
    ``custom.x``; relative imports are resolved against the importer's package.
    """
    files = {module_name(p, root): p for p in sorted((root / "custom").rglob("*.py"))}
    found = []
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        in_function = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                while target and target not in files:  # ``import custom.x.y.attr`` -> the module custom.x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    text = "\n".join(lines[max(node.lineno - 2, 0) : node.end_lineno])
                    found.append((name, target, node.lineno, id(node) in in_function, text))
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the package ``module`` belongs to (-1: ``custom`` itself)."""
    return next((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")), -1)


def test_find_cycle_names_the_modules_in_order():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None


def test_no_import_cycle_between_custom_modules_counting_imports_inside_functions():
    imports = custom_imports()
    edges: dict[str, set[str]] = {}
    for importer, imported, *_ in imports:
        edges.setdefault(importer, set()).add(imported)
    cycle = find_cycle(edges)
    if cycle:
        where = {(a, b): line for a, b, line, *_ in imports}
        steps = [f"{a} -> {b} (line {where[a, b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
        raise AssertionError("import cycle between custom modules: " + "; ".join(steps))


def test_every_package_of_custom_has_a_layer():
    assert {module_name(p, REPO).split(".")[1] for p in (REPO / "custom").glob("*/__init__.py")} | {"utils"} == {
        layer.split(".")[1] for layer in LAYERS
    }, "a package of custom/ is missing from LAYERS: place it"


def test_each_package_imports_only_the_layers_below_it():
    """utils <- data <- networks <- engines <- inference <- segmentation <- tools: e.g. ``custom.networks`` never
    imports ``custom.segmentation`` or ``custom.inference``."""
    upward = [f"{a} imports {b} (line {line})" for a, b, line, *_ in custom_imports() if layer_of(b) > layer_of(a)]
    assert not upward, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_an_import_of_custom_inside_a_function_says_why_it_is_lazy():
    """Imports of ``custom`` modules sit at the top of the module; one that must be lazy (an optional package
    behind it, a measured import cost) carries a ``# lazy: <why>`` comment on its line or the line above."""
    hidden = [
        f"{a}:{line} imports {b}" for a, b, line, inside, text in custom_imports() if inside and "# lazy:" not in text
    ]
    assert not hidden, "custom imports inside functions without a '# lazy: <why>' comment:\n" + "\n".join(hidden)

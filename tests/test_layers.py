"""Imports in hessgap flow one way, foundations → ops → curvature → sharp, spectrum → train → experiments
→ cli, and no modules import each other in a cycle.

Read from the source (every import statement, at module level or inside a function), not from what
happens to be imported at run time.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hessgap"

# the rank of each part of the package: a module may import parts of lower rank, and its own part
RANK = {
    "errors": 0, "_version": 0,
    "_checks": 1, "_io": 1, "names": 1, "_extension": 1, "_memory": 1,
    "_results": 2, "_state": 2, "distributed": 2,
    "ops": 3, "info": 3,
    "curvature": 4,
    "sharp": 5, "spectrum": 5,
    "landscape": 6, "measures": 6, "tracking": 6,
    "train": 7, "integrations": 7,
    "experiments": 8,
    "cli": 9, "__main__": 10,
}
# the package's own __init__ maps public names to modules by string and imports nothing eagerly
SKIP = {"__init__.py"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if str(p.relative_to(PACKAGE)) not in SKIP)


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, module_level_only: bool = False):
    """(line, the hessgap module named) for each import of a hessgap module in the file."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]  # the folder it lives in
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hessgap":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "hessgap":
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{module}.{n}" for n in names if (PACKAGE.parent / f"{module}.{n}".replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / f"{module}.{n}".replace(".", "/")).is_dir()]
            yield from ((node.lineno, m) for m in (submodules or [module]))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward(path):
    own = _part(path)
    assert own in RANK, f"{path.relative_to(PACKAGE)} belongs to no part of the package; give it a rank here"
    for line, module in _imported(path):
        parts = module.split(".")
        assert len(parts) > 1, f"{path.name}:{line} imports the top-level package hessgap"
        target = parts[1]
        assert target in RANK, f"{path.name}:{line} imports {module}, which has no rank"
        if target != own:
            assert RANK[target] < RANK[own], f"{path.name}:{line}: {own} must not import {module}"


def test_no_import_cycles_between_modules():
    graph = {}
    for path in _modules():
        graph[_name(path)] = {m for _, m in _imported(path, module_level_only=True) if m != _name(path)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt in graph and state.get(nxt) != 2:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) != 2:
            visit(node, [node])

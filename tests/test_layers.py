"""Imports in hessgap's core flow one way: foundations → ops → curvature → sharp, spectrum.

Read from the source (every import statement, at module level or inside a function), not from what
happens to be imported at run time.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hessgap"

# the rank of each part of the core: a module may import parts of lower rank, and its own part
RANK = {
    "errors": 0, "_checks": 0, "_io": 0, "names": 0, "_state": 0, "_results": 0, "_extension": 0, "_version": 0,
    "ops": 1,
    "curvature": 2,
    "sharp": 3,
    "spectrum": 3,
}
CORE = ["_state.py", "ops", "curvature", "sharp", "spectrum"]


def _modules():
    for entry in CORE:
        path = PACKAGE / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported(path: Path):
    """(line, the hessgap module named) for each import of a hessgap module in the file."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-1]  # the folder it lives in
    for node in ast.walk(ast.parse(path.read_text())):
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
            if module == "hessgap":  # from hessgap import _checks: the names are modules
                for alias in node.names:
                    yield node.lineno, f"hessgap.{alias.name}"
            else:
                yield node.lineno, module


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward(path):
    own = _part(path)
    for line, module in _imported(path):
        parts = module.split(".")
        assert len(parts) > 1, f"{path.name}:{line} imports the top-level package hessgap"
        target = parts[1]
        assert target in RANK, f"{path.name}:{line} imports {module}, outside the core"
        if target != own:
            assert RANK[target] < RANK[own], f"{path.name}:{line}: {own} must not import {module}"

"""Every third-party package the library imports is declared in pyproject.toml: a module-level
import in ``dependencies`` (a plain ``pip install`` must import it), one inside a function or a
``try`` in ``dependencies`` or an optional extra (``hf``, ``gpu``, ...; not ``dev``)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("rewriter", "passes", "targets", "models")


def _dist_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level outside any try) per import of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], id(node) in top) for n in names]
    return out


def _third_party() -> dict[str, bool]:
    """top-level module -> imported unconditionally somewhere in the library."""
    found: dict[str, bool] = {}
    for folder in LIBRARY:
        for path in (ROOT / folder).rglob("*.py"):
            for name, required in _imports(path):
                if name in sys.stdlib_module_names or name in ("rewriter", "__future__"):
                    continue
                found[name] = found.get(name, False) or required
    return found


def test_every_imported_package_is_declared():
    project = _project()
    core = _dist_names(project["dependencies"])
    extras = set().union(*(_dist_names(reqs) for name, reqs in
                           project.get("optional-dependencies", {}).items() if name != "dev"))
    dists = md.packages_distributions()
    missing = []
    for module, required in sorted(_third_party().items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        declared = core if required else core | extras
        if not names & declared:
            missing.append(f"{module} ({'module level' if required else 'optional'}: "
                           f"{', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


@pytest.mark.parametrize("module", ["numpy", "onnx_ir"])
def test_the_onnx_stack_dependencies_are_declared(module):
    """numpy and onnx_ir are imported by targets/ at module level (issue 11)."""
    assert _third_party().get(module) is True
    assert md.packages_distributions()[module][0].lower().replace("_", "-") in \
        _dist_names(_project()["dependencies"])

"""Checks on the library's source text.

* Every third-party package the library imports is declared in pyproject.toml: a module-level
  import in ``dependencies`` (a plain ``pip install`` must import it), one inside a function or
  a ``try`` in ``dependencies`` or an optional extra (``hf``, ``gpu``, ...; not ``dev``).
* Docstrings stand on their own and use the installed names: no "see DESIGN.md" (not shipped),
  no "(to come)", no ``passes.x`` / ``models.x`` / ``targets.x`` cross-references.
"""

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


STALE = [
    (re.compile(r"DESIGN\.md"), "refers to DESIGN.md, which is not shipped"),
    (re.compile(r"\(to come\)"), "promises work that is done or dropped"),
    (re.compile(r"(?<![\w./])~?(passes|models|targets)\.(?!py\b)[a-z_]\w*"),
     "names a module without its rewriter. root"),
]


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of ``path``."""
    text = path.read_text()
    tree = ast.parse(text)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    out += [(i, line.split("#", 1)[1]) for i, line in enumerate(text.splitlines(), 1)
            if "#" in line]
    return out


def test_docstrings_are_self_contained_and_use_the_installed_names():
    found = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _strings(path):
                for pattern, why in STALE:
                    m = pattern.search(text)
                    if m:
                        found.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r} {why}")
    assert not found, "\n".join(found)

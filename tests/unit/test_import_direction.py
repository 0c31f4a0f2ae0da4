"""Our packages import each other in one direction only: launcher -> training -> sharding -> slurm -> common.

Every import counts, wherever it is in the file (inside functions and `if TYPE_CHECKING:` too), and so does
`importlib.import_module("...")` with a literal name: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> the packages of ours it may import (its own modules are always fine).
ALLOWED: dict[str, frozenset[str]] = {
    "launcher": frozenset({"slurm", "sharding", "training", "common"}),
    "training": frozenset({"sharding", "slurm", "common"}),
    "sharding": frozenset({"slurm", "common"}),
    "slurm": frozenset({"common"}),
    "common": frozenset(),  # neutral helpers: nothing of ours
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the scanned root
    line: int
    text: str  # the statement as written, e.g. "from launcher.rundir import RunDir"
    source: str  # package of the importing file
    target: str  # top-level package imported ("" for a relative import that leaves the root)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _dynamic_name(node: ast.Call) -> str | None:
    """The literal module name of `importlib.import_module("x")`, `import_module("x")` or `__import__("x")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
            return arg.value
    return None


def imports_in(root: Path, packages: tuple[str, ...] = tuple(ALLOWED)) -> list[Import]:
    """Every import in every .py file under root/<package>, each with the top-level package it names."""
    found: list[Import] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                modules: list[tuple[str, str]] = []  # (absolute module name, statement text)
                if isinstance(node, ast.Import):
                    modules = [(alias.name, f"import {alias.name}") for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ", ".join(alias.name for alias in node.names)
                    text = f"from {'.' * node.level}{node.module or ''} import {names}"
                    if node.level:  # relative: resolve against the importing file's own package
                        here, up = rel.parent.parts, node.level - 1
                        base = list(here[:len(here) - up])
                        if up > len(here):
                            modules = [("", text)]  # climbs out of the scanned root
                        elif node.module or base:
                            modules = [(".".join([*base, *([node.module] if node.module else [])]), text)]
                        else:  # `from .. import launcher` in a top-level package: the names are packages
                            modules = [(alias.name, text) for alias in node.names]
                    else:
                        modules = [(node.module or "", text)]
                elif isinstance(node, ast.Call) and (name := _dynamic_name(node)) is not None:
                    modules = [(name, ast.unparse(node))]
                for module, text in modules:
                    found.append(Import(str(rel), getattr(node, "lineno", 0), text, package, module.split(".")[0]))
    return found


def forbidden_imports(root: Path) -> list[Import]:
    """Imports of our own packages that go against ALLOWED."""
    return [imp for imp in imports_in(root)
            if imp.target in ALLOWED and imp.target != imp.source and imp.target not in ALLOWED[imp.source]]


def check_import_direction(root: Path) -> None:
    """Raise AssertionError listing each forbidden import of the tree at `root` as `file:line: import`."""
    offending = forbidden_imports(root)
    if offending:  # raised, not asserted: pytest would prefix each line of an assert message with "~"
        raise AssertionError(
            f"{len(offending)} import(s) against the package direction (launcher -> training -> sharding -> slurm -> "
            "common; nothing imports launcher; common imports nothing of ours):\n" + "\n".join(map(str, offending)))


def test_every_import_between_our_packages_goes_down_the_allowed_graph() -> None:
    check_import_direction(REPO)


def test_the_scan_reads_every_package_and_finds_the_real_edges() -> None:
    found = imports_in(REPO)
    for package in ALLOWED:
        files = list((REPO / package).rglob("*.py"))
        assert files, f"no .py files under {package}/: the package moved, update ALLOWED"
        assert any(imp.source == package for imp in found), package
    edges = {(imp.source, imp.target) for imp in found}
    assert {("launcher", "slurm"), ("launcher", "training"), ("training", "sharding"), ("sharding", "slurm")} <= edges


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_check_names_each_forbidden_import_by_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, {
        "launcher/__init__.py": "",
        "launcher/cli.py": "import json\nimport training.loop\nfrom common import publish\n",  # allowed
        "training/__init__.py": "",
        "training/loop.py": """\
            from __future__ import annotations
            from typing import TYPE_CHECKING
            from sharding.shards import Manifest
            if TYPE_CHECKING:
                from launcher.rundir import RunDir
            """,
        "sharding/__init__.py": "",
        "sharding/stage.py": """\
            import importlib
            from . import shards
            from .sub import deep

            def late():
                import training.topk_cache as cache
                return importlib.import_module("launcher.stages"), cache
            """,
        "sharding/sub/deep.py": "from ..shards import Manifest\nfrom slurm.resources import Resources\n",
        "slurm/__init__.py": "",
        "slurm/executor.py": "import os\nfrom ..launcher import cli\nfrom common.publish import commit_file\n",
        "common/__init__.py": "",
        "common/publish.py": "import os\n\n\ndef f():\n    from slurm import files\n    return files\n",
    })
    assert [str(imp) for imp in forbidden_imports(tmp_path)] == [
        "training/loop.py:5: from launcher.rundir import RunDir",
        "sharding/stage.py:6: import training.topk_cache",
        "sharding/stage.py:7: importlib.import_module('launcher.stages')",
        "slurm/executor.py:2: from ..launcher import cli",
        "common/publish.py:5: from slurm import files",
    ]
    assert not any(imp.file == "sharding/sub/deep.py" for imp in forbidden_imports(tmp_path))  # ..shards: itself
    # The very check run on the real tree fails on this one, with one offence per line.
    with pytest.raises(AssertionError) as info:
        check_import_direction(tmp_path)
    message = str(info.value)
    assert message.startswith("5 import(s) against the package direction")
    assert "\ncommon/publish.py:5: from slurm import files" in message
    assert "\nslurm/executor.py:2: from ..launcher import cli" in message


def test_relative_imports_resolve_against_the_importing_package(tmp_path: Path) -> None:
    _write(tmp_path, {
        "slurm/a/b.py": "from .. import files\nfrom ...common import publish\nfrom .... import far\n",
        "slurm/__init__.py": "from . import executor\n",
        "common/x.py": "from .. import slurm, json\n",
    })
    got = {(imp.file, imp.line, imp.target) for imp in imports_in(tmp_path, ("slurm", "common"))}
    assert got == {("slurm/a/b.py", 1, "slurm"), ("slurm/a/b.py", 2, "common"), ("slurm/a/b.py", 3, ""),
                   ("slurm/__init__.py", 1, "slurm"), ("common/x.py", 1, "slurm"), ("common/x.py", 1, "json")}
    assert [str(imp) for imp in forbidden_imports(tmp_path)] == ["common/x.py:1: from .. import slurm, json"]

"""pyproject.toml declares what the tests need: every third-party module that tests/ and scripts/ import
comes from a dependency that `pip install -e ".[dev]"` installs, and torch's floor is the version CI tests."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution, where they differ (checked against the installed packages when present)
DISTRIBUTIONS = {"yaml": "pyyaml", "faiss": "faiss-cpu", "PIL": "pillow"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def declared_for_dev() -> set[str]:
    """The distributions `pip install -e ".[dev]"` asks for: the dependencies, the dev extra and the
    extras it names (lmzoo[serve], ...), by normalised name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    found, pending, seen = {requirement_name(r) for r in project["dependencies"]}, ["dev"], set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for requirement in extras[extra]:
            inner = re.fullmatch(r"\s*lmzoo\[([^\]]+)\]\s*", requirement)
            if inner:
                pending += [e.strip() for e in inner.group(1).split(",") if e.strip() not in seen]
            else:
                found.add(requirement_name(requirement))
    return found


def imported_modules(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it (import, from-import, pytest.importorskip)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_third_party_module_the_tests_import_is_declared():
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    local = {"lmzoo"} | {path.stem for path in files}
    third_party = {
        name: where
        for name, where in imported_modules(files).items()
        if name not in local and name not in sys.stdlib_module_names and name != "__future__"
    }
    assert {"torch", "pytest", "yaml"} <= set(third_party)  # the scan sees imports at all
    declared = declared_for_dev()
    installed = importlib.metadata.packages_distributions()
    missing = {}
    for name, where in sorted(third_party.items()):
        candidates = {normalise(d) for d in installed.get(name, [])} | {
            normalise(DISTRIBUTIONS.get(name, name))
        }
        if not candidates & declared:
            missing[name] = sorted(where)
    assert not missing, f"imported by the tests but declared by no dependency of lmzoo[dev]: {missing}"


def test_the_torch_floor_is_the_version_ci_tests():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (torch,) = [r for r in project["dependencies"] if requirement_name(r) == "torch"]
    floor = re.fullmatch(r"torch>=(\d+)\.(\d+)", torch.replace(" ", ""))
    assert floor, torch
    assert (int(floor.group(1)), int(floor.group(2))) >= (2, 6)  # FSDP's fully_shard import path
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        pinned = re.search(r"torch==(\d+)\.(\d+)", ci.read_text(encoding="utf-8"))
        assert pinned and floor.groups() == pinned.groups(), (torch, pinned and pinned.group(0))


def test_every_package_folder_is_a_regular_package():
    """A folder of modules without __init__.py is a namespace package, which setuptools' package
    discovery leaves out of a wheel: `pip install .` would install lmzoo without it."""
    folders = {path.parent for path in (ROOT / "lmzoo").rglob("*.py") if "__pycache__" not in path.parts}
    assert not [str(f) for f in folders if not (f / "__init__.py").is_file()]

"""The import rules and the exception rule, read from the source (one check imports the bottom
modules in a fresh interpreter, to see what they load).

- Layers import downwards only: kernels < models < engine < streams (ARCHITECTURE.md).
- The clients speak the wire protocol: what they import, directly or through another livediff
  module, is their own modules and the bottom ones, never ``livediff.streams``,
  ``livediff.engine``, ``livediff.models`` or ``livediff.kernels``.
- ``livediff.exceptions``, ``livediff.wire`` and ``livediff.ice`` are the bottom: they import no
  other livediff module but each other, so every layer (kernels included) may import them;
  ``exceptions`` and ``wire`` load nothing heavy (no torch, numpy, Pillow, aiohttp, aiortc).
- Product code raises livediff's exceptions, never a bare ``ValueError``, ``TypeError`` or
  ``RuntimeError`` (:mod:`livediff.exceptions` subclasses them where callers catch them).
- Every package's docstring says what the layer owns.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "models", "kernels", "streams", "clients", "bench")
PRODUCT = ("livediff", *LAYERS)
BOTTOM = frozenset({"livediff.exceptions", "livediff.wire", "livediff.ice"})
BARE = frozenset({"ValueError", "TypeError", "RuntimeError"})


def module_files() -> dict[str, Path]:
    """``livediff.engine.runtime`` → ``engine/runtime.py``, for every product module."""
    modules: dict[str, Path] = {}
    for folder in PRODUCT:
        package = "livediff" if folder == "livediff" else f"livediff.{folder}"
        for path in sorted((REPO / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


MODULES = module_files()


@cache
def imports_of(module: str) -> frozenset[str]:
    """The livediff modules ``module`` imports anywhere in its body (functions included)."""
    path = MODULES[module]
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name in MODULES)


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports_of(module))
    return seen


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "livediff"


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("kernels", ("models", "engine", "streams", "clients", "bench")),
        ("models", ("engine", "streams", "clients", "bench")),
        ("engine", ("streams", "clients", "bench")),
        ("streams", ("clients", "bench")),
    ],
)
def test_layers_import_downwards_only(lower: str, higher: tuple[str, ...]) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module in MODULES
        if layer(module) == lower
        for target in imports_of(module)
        if layer(target) in higher
    )
    assert wrong == []


def test_the_product_does_not_import_the_benchmarks() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module in MODULES
        if layer(module) != "bench"
        for target in imports_of(module)
        if layer(target) == "bench"
    )
    assert wrong == []


@pytest.mark.parametrize("client", sorted(m for m in MODULES if layer(m) == "clients"))
def test_clients_reach_only_their_own_and_the_bottom_modules(client: str) -> None:
    outside = sorted(
        m for m in reachable(client) if layer(m) != "clients" and m not in BOTTOM | {"livediff"}
    )
    assert outside == [], f"{client} reaches server modules"


@pytest.mark.parametrize("module", sorted(BOTTOM))
def test_bottom_modules_import_only_each_other(module: str) -> None:
    assert imports_of(module) <= BOTTOM - {module} | {"livediff"}


def test_bottom_modules_load_nothing_heavy() -> None:
    code = (
        "import sys, livediff.wire, livediff.exceptions;"
        "print(sorted(m for m in sys.modules if m.startswith('livediff') or m in "
        "('torch', 'numpy', 'aiohttp', 'aiortc', 'PIL')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["['livediff',", "'livediff.exceptions',", "'livediff.wire']"]


def bare_raises(source: str, name: str) -> Iterator[str]:
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(target, ast.Name) and target.id in BARE:
            yield f"{name}:{node.lineno}: raise {target.id}"


def test_product_code_raises_no_bare_builtin_error() -> None:
    found = [
        line
        for path in MODULES.values()
        for line in bare_raises(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert found == [], "raise a livediff.exceptions class (it may subclass the built-in)"


def test_the_scan_sees_bare_raises_and_passes_livediff_ones() -> None:
    source = (
        "def f():\n    raise ValueError('x')\n\n"
        "def g():\n    raise TypeError\n\n"
        "def h():\n    raise ParameterError('x') from None\n\n"
        "def i():\n    try:\n        pass\n    except KeyError:\n        raise\n"
    )
    assert list(bare_raises(source, "sample.py")) == [
        "sample.py:2: raise ValueError",
        "sample.py:5: raise TypeError",
    ]


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.stem == "__init__"))
def test_every_package_says_what_it_owns(package: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text())) or ""
    assert len(doc) > 200 and "placeholder" not in doc.lower()

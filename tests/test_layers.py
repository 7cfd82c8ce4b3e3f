"""The layers of docs/architecture.md, checked on the code: who may import whom.

The core must run without Ray, Optuna or MLflow (a library in anyone's
training loop, and a trial that tests can run without a cluster); each adapter
is the only place that talks to its system; nothing below the faces imports
them. Checked twice: by reading every import statement (AST, so a lazy import
inside a function counts too) and by importing the core in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "r2sweep"
EXTERNAL = {"ray", "optuna", "mlflow"}
#: layer -> the r2sweep layers and the external systems it may import.
ALLOWED = {
    "core": ({"core"}, set()),
    "tracking": ({"core", "tracking"}, {"mlflow"}),
    "tune": ({"core", "tracking", "tune"}, {"ray", "optuna"}),
    "analysis": ({"core", "tracking", "tune", "analysis"}, {"ray", "optuna", "mlflow"}),
    "api": ({"core", "tracking", "tune", "analysis", "api"}, {"ray", "optuna", "mlflow"}),
    "cli": ({"core", "tracking", "tune", "analysis", "api", "cli"}, set()),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "r2sweep":  # from r2sweep import core: a layer by name
                names |= {f"r2sweep.{alias.name}" for alias in node.names}
    return names


def _layer_files() -> list[tuple[str, Path]]:
    return [(path.relative_to(PACKAGE).parts[0], path) for path in sorted(PACKAGE.rglob("*.py"))
            if len(path.relative_to(PACKAGE).parts) > 1]


def test_every_module_lives_in_a_layer() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py"], "modules belong in a layer folder: " + ", ".join(top)
    assert {layer for layer, _ in _layer_files()} == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    inner, external = ALLOWED[layer]
    for where, path in _layer_files():
        if where != layer:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "r2sweep" and len(parts) > 1 and parts[1] in ALLOWED:
                assert parts[1] in inner, f"{path.relative_to(PACKAGE)} imports {name}"
            elif parts[0] in EXTERNAL:
                assert parts[0] in external, f"{path.relative_to(PACKAGE)} imports {name}"


def test_importing_the_package_and_the_whole_core_starts_no_ray_optuna_or_mlflow() -> None:
    modules = [".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
               for path in sorted((PACKAGE / "core").rglob("*.py"))]
    code = (f"import sys, r2sweep; import {', '.join(modules)};"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'optuna', 'mlflow'});"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(modules) > 40  # every core module was imported, not an empty list

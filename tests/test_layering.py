"""The packages import only downward: models < store < memory < scheduling < runtime, and none of
them imports the engine's edge (session, api, cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import moeflow

LAYERS = ("models", "store", "memory", "scheduling", "runtime")
EDGE = ("session", "api", "cli")
ROOT = Path(moeflow.__file__).parent


def _imports(path: Path) -> list[str]:
    """Every moeflow module `path` imports, at any depth (function-local imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "moeflow":  # from moeflow import store
                out += [f"moeflow.{alias.name}" for alias in node.names]
    return [name for name in out if name.startswith("moeflow.")]


def upward_imports(root: Path) -> list[str]:
    found = []
    for layer, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for name in _imports(path):
                target = name.split(".")[1]
                if (target in LAYERS and LAYERS.index(target) > layer) or target in EDGE:
                    found.append(f"{path.relative_to(root)} imports {name}")
    return found


def test_no_package_imports_a_layer_above_it() -> None:
    assert upward_imports(ROOT) == []


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "codecs.py").write_text("def f():\n    from moeflow.runtime import reference\n")
    for package in LAYERS[2:]:
        (tmp_path / package).mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.py").write_text("from moeflow import session\nfrom moeflow.models import base\n")
    assert upward_imports(tmp_path) == [
        "models/x.py imports moeflow.session",
        "store/codecs.py imports moeflow.runtime",
    ]

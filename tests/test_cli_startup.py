"""The command line a newcomer meets starts at once: help and --version never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from moeflow.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "transformers", "moeflow.api") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["serve", "--help"], ["batch", "--help"]])
def test_help_and_version_never_import_torch(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if argv == ["--version"]:
        import moeflow

        assert done.stdout.strip() == f"moeflow {moeflow.__version__}"


def test_the_package_still_exports_the_engine_lazily() -> None:
    import moeflow

    assert "Engine" in dir(moeflow) and moeflow.Engine.__name__ == "Engine"
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        moeflow.Engin  # noqa: B018

"""Tiny checkpoints for the command-line tests: written once per session by `moeflow synth`
(config, weights and a tokenizer), copied for a test that must start without an expert store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def synth_model(tmp_path_factory: pytest.TempPathFactory, arch: str = "mixtral") -> Path:
    """A tiny random `arch` checkpoint with a tokenizer, shared by the session's tests."""
    from moeflow.models.synth import synthesize

    out = tmp_path_factory.getbasetemp() / "cli-models" / arch
    if not (out / "config.json").is_file():
        synthesize(out, arch, "tiny", progress=False)
    return out


def fresh_copy(model: Path, dst: Path) -> Path:
    """The checkpoint's files in `dst`, without its expert store (so opening it would build one)."""
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns(".moeflow"))
    return dst

"""Shared fixtures: tiny checkpoints written by transformers' own save_pretrained, GPU skipping."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# The server is an optional extra (`moeflow[serve]`, which CI installs): where it is missing
# (the GPU machine), its tests are not collected rather than failing collection for all.
collect_ignore = [] if importlib.util.find_spec("starlette") else ["serve"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _has_gpu() -> bool:
    try:
        from moeflow import _core

        return bool(_core.cuda_available() and torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["emu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Where a kernel test runs runtime/gpu.py's launches: on the GPU where there is one, and
    everywhere on the CPU through tests/emu (the same sources and Launch objects, compiled by g++)."""
    if request.param == "cuda":
        return torch.device("cuda")
    from tests import emu

    reason = emu.unavailable()
    if reason:
        pytest.skip(reason)
    from moeflow.runtime import gpu, mxfp4_gpu

    for module in (gpu, mxfp4_gpu):  # every module that launches kernels through its own `run`
        monkeypatch.setattr(module, "run", emu.run)
    return torch.device("cpu")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> "HFCheckpoints":
    return HFCheckpoints(tmp_path_factory.mktemp("hf"))


class HFCheckpoints:
    """Builds (once per session) a tiny random checkpoint per family with transformers."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @functools.cache
    def path(self, family: str) -> Path:
        from tests.hf_models import save_tiny

        return save_tiny(family, self.root / family)


@pytest.fixture
def few_buckets(monkeypatch: pytest.MonkeyPatch) -> tuple[int, ...]:
    """The kernel table's row buckets cut to 1-16 rows (the same powers of two, so `bucket()` and
    the file format keep their meaning): an emulated tuner run then skips the decode kernel at
    32-512 rows, ~20 s of CI, while every path is still timed and checked at each bucket."""
    from moeflow.runtime import kernel_choice, kernel_tune

    few = kernel_choice.BUCKETS[:5]
    for module in (kernel_choice, kernel_tune):
        monkeypatch.setattr(module, "BUCKETS", few)
    monkeypatch.setattr(kernel_choice, "_LAST", len(few) - 1)
    return few

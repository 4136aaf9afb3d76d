"""moeflow: run Mixture-of-Experts models whose experts do not fit in fast memory.

    import moeflow
    async with moeflow.Engine.open(path, expert_budget="2GiB", device="auto") as eng:
        res = await eng.generate("def fib(n):", max_new_tokens=32)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from moeflow._core import __version__

if TYPE_CHECKING:
    from moeflow.api import Engine, EngineState, GenerationResult, SamplingParams, StreamStep, TokenLogprob
    from moeflow.config import EngineConfig, MemoryPlan
    from moeflow.errors import (
        CheckpointError,
        ConfigError,
        EngineClosed,
        InvalidRequest,
        MoeflowError,
        OutOfBudget,
        StoreError,
        TransferError,
        UnsupportedModel,
    )
    from moeflow.llm import LLM
    from moeflow.stats import EngineStats, RequestStats

# Imported on first use (PEP 562): the engine pulls in torch, which takes seconds, and the
# command line (`moeflow --help`) or a light import must not wait for it.
_LAZY = {
    "Engine": "moeflow.api", "EngineState": "moeflow.api", "GenerationResult": "moeflow.api",
    "SamplingParams": "moeflow.api", "StreamStep": "moeflow.api", "TokenLogprob": "moeflow.api",
    "EngineConfig": "moeflow.config", "MemoryPlan": "moeflow.config",
    "CheckpointError": "moeflow.errors", "ConfigError": "moeflow.errors", "EngineClosed": "moeflow.errors",
    "InvalidRequest": "moeflow.errors", "MoeflowError": "moeflow.errors", "OutOfBudget": "moeflow.errors",
    "StoreError": "moeflow.errors", "TransferError": "moeflow.errors", "UnsupportedModel": "moeflow.errors",
    "LLM": "moeflow.llm", "EngineStats": "moeflow.stats", "RequestStats": "moeflow.stats",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

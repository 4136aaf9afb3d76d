"""moeflow: run Mixture-of-Experts models whose experts do not fit in fast memory.

    import moeflow
    async with moeflow.Engine.open(path, expert_budget="2GiB", device="auto") as eng:
        res = await eng.generate("def fib(n):", max_new_tokens=32)
"""

from moeflow._core import __version__
from moeflow.api import Engine, EngineState, GenerationResult
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

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineState",
    "EngineStats",
    "GenerationResult",
    "InvalidRequest",
    "LLM",
    "MemoryPlan",
    "MoeflowError",
    "OutOfBudget",
    "RequestStats",
    "StoreError",
    "TransferError",
    "UnsupportedModel",
    "__version__",
]

"""Tier planning, in one place and once per engine: how the expert budget splits between
precisions, and which tiers hold the experts (device, pinned host, disk)."""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.config import Budget, EngineConfig, MemoryPlan
from moeflow.errors import ConfigError


@dataclass(frozen=True)
class TierPlan:
    """Where every expert lives for one engine.

    - `device` "cpu": the fast tier is RAM (`fast`), the store on disk is the home of every expert.
    - `device` "cuda" or "sim": the fast tier is device memory (`fast`); the slow tier is a pinned
      host home holding every expert, or, when `host` is set, a pinned host cache of that size
      with the disk behind it (three tiers).
    - `low`: HOBBIT's low-precision cache, carved out of the expert budget (miss_precision).
    """

    device: str
    fast: MemoryPlan
    low: MemoryPlan | None = None
    host: MemoryPlan | None = None

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"


def plan_tiers(
    config: EngineConfig, device: str, block_bytes: int, low_block_bytes: int | None, experts_total: int, top_k: int
) -> TierPlan:
    """The tiers for `config` on `device`, given one expert's block size in the store's precision
    (and in the low precision when `config.miss_precision` is set). Raises ConfigError naming the
    option for a budget below the top-k experts of one layer."""
    if config.miss_precision is None or low_block_bytes is None:
        fast = MemoryPlan.build(config.expert_budget, block_bytes, experts_total, top_k)
        low = None
    else:
        total = config.expert_budget.resolve(block_bytes * experts_total)
        low_bytes = int(total * config.low_precision_share)
        try:
            fast = MemoryPlan.build(Budget(bytes=total - low_bytes), block_bytes, experts_total, top_k)
            low = MemoryPlan.build(Budget(bytes=low_bytes), low_block_bytes, experts_total, top_k)
        except ConfigError as e:
            raise ConfigError(
                f"expert_budget={config.expert_budget} split {1 - config.low_precision_share:.0%} high / "
                f"{config.low_precision_share:.0%} low precision ({config.miss_precision}): {e}"
            ) from e
    host = None
    if device != "cpu" and config.host_budget is not None:
        total = block_bytes * experts_total
        if config.host_budget.resolve(total) < total:
            host = MemoryPlan.build(config.host_budget, block_bytes, experts_total, top_k, option="host_budget")
    return TierPlan(device, fast, low, host)

"""Memory tiers: the fast tier is an arena of the budget's size with a slab allocator over it."""

from __future__ import annotations

from moeflow import _core
from moeflow.config import MemoryPlan


class FastTier:
    """Where experts are computed from: host RAM on a CPU machine (device memory on a GPU one)."""

    def __init__(self, plan: MemoryPlan, *, lock: bool = True) -> None:
        self.plan = plan
        self.arena = _core.HostArena(plan.arena_bytes, lock=lock)
        self.allocator = _core.SlabAllocator(self.arena, plan.arena_bytes, slab_size=plan.block_bytes)
        self.slots = plan.slots

    @property
    def kind(self) -> str:
        return "host"

    def stats(self) -> dict[str, object]:
        s = dict(self.allocator.stats())
        s["locked"] = self.arena.locked
        return s

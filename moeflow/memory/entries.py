"""The expert cache's bookkeeping records: an entry per expert holding a block, its states, the
counters, and the plain per-layer plan the scheduler hands the cache."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from moeflow import _core
from moeflow.memory.policies import ExpertKey
from moeflow.memory.sources import Ticket
from moeflow.store.layout import ExpertView

DEMAND = _core.PRIORITY_DEMAND
PREFETCH = _core.PRIORITY_PREFETCH
BACKGROUND = _core.PRIORITY_BACKGROUND


class EntryState(enum.Enum):
    LOADING = "loading"
    ISSUED = "issued"  # device copy queued: usable by a compute stream that waits on its event
    READY = "ready"


USABLE_STATES = (EntryState.READY, EntryState.ISSUED)


@dataclass(eq=False)
class Entry:
    key: ExpertKey
    handle: _core.BlockHandle
    state: EntryState
    address: int  # of the block in its tier (what the simulated device's checker tracks)
    ticket: Ticket | None = None
    weights: ExpertView | None = None
    pins: int = 0
    prefetched: bool = False  # loaded ahead of need and not used yet
    priority: int = DEMAND
    last_step: int = -1  # the step that last used (or loaded) it
    submitted_speculative: bool = False
    # an event after the last compute that read the block (device tiers): a copy reusing the
    # block waits on it
    fence: _core.CudaEvent | None = None
    cancelled: bool = False  # its load was cancelled and its block not yet given back
    # why its load failed (typed, naming the layer, expert and file); the entry is gone from
    # the cache by then, and whoever watched it raises this
    error: BaseException | None = None


def usable(entry: Entry) -> bool:
    """Its bytes may be computed on: resident, or (device) its copy is queued before use."""
    return entry.state in USABLE_STATES


@dataclass
class CacheCounters:
    hits: int = 0  # a layer found the expert resident (landed)
    inflight_hits: int = 0  # a layer found its load already in flight (a prefetch not landed yet)
    misses: int = 0  # a layer had to start its load
    loads: int = 0
    bytes_loaded: int = 0  # bytes that landed
    load_seconds: float = 0.0  # sum of transfer durations
    stall_seconds: float = 0.0  # time compute waited for experts
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # prefetched, then evicted or cancelled before any use
    prefetch_cancelled: int = 0
    load_errors: int = 0


@dataclass
class PrefetchPlan:
    """What the scheduler wants done for a layer, as plain data; `ExpertCache.apply` does it.

    `loads` are tried in order (nearest layer, likeliest expert first); the cache stops at the
    first that finds no room without evicting a protected expert (`protect`, and every load
    before it in the list: a nearer guess is never evicted for a farther one), or once
    `max_speculative` speculative loads are in flight. `cancel` names queued prefetches no
    longer wanted."""

    loads: list[tuple[ExpertKey, int]] = field(default_factory=list)  # (expert, priority)
    cancel: list[ExpertKey] = field(default_factory=list)
    protect: set[ExpertKey] = field(default_factory=set)
    quotas: dict[int, int] | None = None  # PLEC per-layer slots; None leaves them as they are
    max_speculative: int = 1 << 30


def protect_set(protect: Iterable[ExpertKey], key: ExpertKey) -> set[ExpertKey]:
    s = set(protect)
    s.add(key)
    return s

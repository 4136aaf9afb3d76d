"""The expert cache: which experts hold a block of the fast tier, loading, pinning and eviction."""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moeflow import _core
from moeflow.memory.transfers import AsyncTransfers
from moeflow.memory.policies import EvictionPolicy, Evictable, ExpertKey
from moeflow.memory.sources import Source, Ticket
from moeflow.memory.tiers import DeviceTier, FastTier
from moeflow.store.layout import ExpertView

Tier = FastTier | DeviceTier

DEMAND = _core.PRIORITY_DEMAND
PREFETCH = _core.PRIORITY_PREFETCH
# A speculative load may only evict an expert idle for this many steps (not used by the step
# running nor the one before): recent experts are the likeliest to be needed again, and
# trading them for a guess thrashes a small cache.
SPECULATIVE_MIN_IDLE_STEPS = 2


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
    ticket: Ticket | None = None
    weights: ExpertView | None = None
    pins: int = 0
    prefetched: bool = False  # loaded ahead of need and not used yet
    priority: int = DEMAND
    last_step: int = -1  # the step that last used (or loaded) it
    submitted_speculative: bool = False


@dataclass
class CacheCounters:
    hits: int = 0  # a layer found the expert resident
    misses: int = 0  # a layer had to wait for (or start) its load
    inflight_hits: int = 0  # misses whose load was already in flight (a late prefetch)
    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0  # sum of transfer durations
    stall_seconds: float = 0.0  # time layers spent waiting for experts
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # prefetched, then evicted or cancelled before any use
    prefetch_cancelled: int = 0
    load_errors: int = 0


class ExpertCache:
    """Maps (layer, expert) to a block of the fast tier.

    Invariants: an entry is in `entries` from the moment its block is allocated until it is
    evicted; a pinned entry (pins > 0) is never evicted; a LOADING entry's block is owned by
    its transfer, which frees it if the load fails or is cancelled.
    """

    def __init__(self, tier: Tier, source: Source, transfers: AsyncTransfers, policy: EvictionPolicy) -> None:
        self.tier = tier
        self.source = source
        self.transfers = transfers
        self.policy = policy
        self.size_class = tier.allocator.add_class(source.layout.size)
        self.entries: dict[ExpertKey, Entry] = {}
        self.counters = CacheCounters()
        self._changed = asyncio.Event()
        self._views: dict[int, ExpertView] = {}
        self.quotas: dict[int, int] = {}
        self.layer_count: dict[int, int] = {}
        self.step = 0
        self._speculative = 0  # prefetched loads still in flight

    # ---- queries -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.tier.slots

    def state(self, key: ExpertKey) -> EntryState | None:
        entry = self.entries.get(key)
        return entry.state if entry is not None else None

    def resident(self) -> list[ExpertKey]:
        return [k for k, e in self.entries.items() if e.state is EntryState.READY]

    def speculative_in_flight(self) -> int:
        return self._speculative

    def begin_step(self) -> None:
        """A forward step begins (for the recency of speculative evictions)."""
        self.step += 1

    def loading(self) -> int:
        return sum(1 for e in self.entries.values() if e.state is EntryState.LOADING)

    def pinned_blocks(self) -> int:
        return sum(1 for e in self.entries.values() if e.pins > 0)

    # ---- hot path --------------------------------------------------------------------------
    def try_acquire(self, key: ExpertKey) -> ExpertView | None:
        """Pin and return a resident expert's weights (a hit); None, without waiting, otherwise."""
        entry = self.entries.get(key)
        if entry is None or not usable(entry):
            return None
        return self.pin(entry, hit=True)

    def pin(self, entry: Entry, *, hit: bool) -> ExpertView:
        """Pin a usable entry for the current layer and count the use as a hit or a miss. An
        ISSUED entry makes torch's current stream wait on its copy event: the CPU never waits."""
        assert usable(entry) and entry.weights is not None
        if entry.state is EntryState.ISSUED and entry.ticket is not None and entry.ticket.event is not None:
            entry.ticket.event.wait_on(torch.cuda.current_stream().cuda_stream)
        entry.pins += 1
        entry.last_step = self.step
        if hit:
            self.counters.hits += 1
        else:
            self.counters.misses += 1
        if entry.prefetched:
            entry.prefetched = False
            self.counters.prefetch_used += 1
        self.policy.on_access(entry.key)
        return entry.weights

    async def ensure_loading(self, key: ExpertKey, protect: Iterable[ExpertKey] = ()) -> Entry:
        """The entry of `key`, submitting a demand load (after making room) when absent;
        an in-flight load is promoted to demand priority."""
        while True:
            entry = self.entries.get(key)
            if entry is not None:
                if entry.state is not EntryState.READY:
                    if entry.prefetched:
                        self.counters.inflight_hits += 1
                    self._promote(entry)
                return entry
            await self.make_room(protect_set(protect, key))
            if key not in self.entries:
                return self._submit(key, DEMAND, prefetched=False)

    async def wait_ready(self, entry: Entry) -> None:
        """Wait for a LOADING entry's transfer; raise its (described) error if it failed."""
        ticket = entry.ticket
        if usable(entry) or ticket is None:
            return
        await ticket.wait_done()
        error = ticket.error()
        if error is not None:
            raise self.describe(entry.key, error) from error

    async def acquire(self, key: ExpertKey, protect: Iterable[ExpertKey] = ()) -> ExpertView:
        """Pin and return an expert's weights, loading it at demand priority when needed."""
        weights = self.try_acquire(key)
        if weights is not None:
            return weights
        started = time.perf_counter()
        try:
            while True:
                entry = await self.ensure_loading(key, protect)
                await self.wait_ready(entry)
                if usable(entry) and self.entries.get(key) is entry:
                    return self.pin(entry, hit=False)
        finally:
            self.counters.stall_seconds += time.perf_counter() - started

    async def wait_change(self) -> None:
        """Wait until a load finishes or fails, or an expert is released or evicted."""
        self._changed.clear()
        await self._changed.wait()

    def release(self, key: ExpertKey) -> None:
        entry = self.entries[key]
        if entry.pins <= 0:
            raise RuntimeError(f"expert {key} released more often than acquired")
        entry.pins -= 1
        if entry.pins == 0:
            self._changed.set()

    # ---- loading ---------------------------------------------------------------------------
    def start_load(self, key: ExpertKey, priority: int, protect: Iterable[ExpertKey] = ()) -> bool:
        """Begin loading `key` without waiting (prefetch or an early demand load).

        Returns False when it is already present or no block can be had without evicting
        a pinned or protected expert (a prefetch never does that)."""
        if key in self.entries:
            entry = self.entries[key]
            if entry.state is EntryState.LOADING and priority < entry.priority:
                self._promote(entry, priority)
            return False
        speculative = priority != DEMAND
        min_idle = SPECULATIVE_MIN_IDLE_STEPS if speculative else 0
        if not self._room_now(protect_set(protect, key), min_idle):
            return False
        self._submit(key, priority, prefetched=speculative)
        return True

    def cancel_load(self, key: ExpertKey) -> bool:
        """Cancel a queued load nobody is waiting for; True when it never ran and its block is free."""
        entry = self.entries.get(key)
        if entry is None or entry.state is not EntryState.LOADING or entry.pins or entry.ticket is None:
            return False
        if not self.source.cancel(entry.ticket):
            return False
        self._forget(key)
        self.counters.prefetch_cancelled += 1
        if entry.prefetched:
            self.counters.prefetch_wasted += 1
        self._changed.set()
        return True

    def _submit(self, key: ExpertKey, priority: int, *, prefetched: bool) -> Entry:
        handle = self.tier.allocator.alloc(self.size_class)
        try:
            ticket = self.source.submit(key, self.tier.allocator, handle, priority)
        except BaseException:
            self.tier.allocator.free(handle)
            raise
        entry = Entry(key, handle, EntryState.LOADING, ticket, prefetched=prefetched, priority=priority,
                      submitted_speculative=prefetched)
        self.entries[key] = entry
        self.layer_count[key[0]] = self.layer_count.get(key[0], 0) + 1
        if prefetched:
            self.counters.prefetch_issued += 1
            self._speculative += 1
        ticket.add_done_callback(functools.partial(self._on_loaded, entry))
        if self.tier.kind == "device":
            ticket.add_issued_callback(functools.partial(self._on_issued, entry))
        return entry

    def _on_issued(self, entry: Entry, ticket: Ticket) -> None:
        if self.entries.get(entry.key) is entry and entry.state is EntryState.LOADING:
            entry.state = EntryState.ISSUED
            entry.weights = self._weights(entry.handle)
            self._changed.set()

    def _on_loaded(self, entry: Entry, ticket: Ticket) -> None:
        self._changed.set()
        if entry.submitted_speculative:
            self._speculative -= 1
        if self.entries.get(entry.key) is not entry:
            return  # cancelled: the core already freed the block
        error = ticket.error()
        if error is not None:
            # The transfer owned the block and freed it; forget the entry so a retry reloads.
            self._forget(entry.key)
            self.counters.load_errors += 1
            return
        completion = ticket.completion()
        entry.state = EntryState.READY
        entry.last_step = self.step
        entry.weights = self._weights(entry.handle)
        self.counters.loads += 1
        self.counters.bytes_loaded += completion.bytes
        self.counters.load_seconds += completion.nanos * 1e-9
        self.policy.on_insert(entry.key)

    def describe(self, key: ExpertKey, error: BaseException) -> BaseException:
        return self.source.describe(key, error)

    def _weights(self, handle: _core.BlockHandle) -> ExpertView:
        view = self._views.get(handle.offset)
        if view is None:
            view = self._views[handle.offset] = self.source.layout.expert_view(self.tier.raw(handle))
        return view

    def _promote(self, entry: Entry, priority: int = DEMAND) -> None:
        if entry.state is EntryState.LOADING and entry.ticket is not None and priority < entry.priority:
            self.source.promote(entry.ticket, priority)
            entry.priority = priority

    # ---- room ----------------------------------------------------------------------------
    def _evictable(self, protect: set[ExpertKey], min_idle: int = 0) -> Evictable:
        def check(key: ExpertKey) -> bool:
            e = self.entries.get(key)
            return (
                e is not None
                and e.state is EntryState.READY
                and e.pins == 0
                and key not in protect
                and self.step - e.last_step >= min_idle
            )

        return check

    def _room_now(self, protect: set[ExpertKey], min_idle: int = 0) -> bool:
        """Make one block available without waiting: free space, or evict an unprotected
        resident idle for at least `min_idle` steps."""
        if len(self.entries) < self.capacity:
            return True
        victim = self._victim(protect, min_idle)
        if victim is None:
            return False
        self.evict(victim)
        return True

    def _victim(self, protect: set[ExpertKey], min_idle: int = 0) -> ExpertKey | None:
        evictable = self._evictable(protect, min_idle)
        if self.quotas:
            # PLEC: take from a layer holding more than its share of the budget, if possible.
            over = {layer for layer, n in self.layer_count.items() if n > self.quotas.get(layer, 0)}
            if over:
                victim = self.policy.victim(lambda k: k[0] in over and evictable(k))
                if victim is not None:
                    return victim
        return self.policy.victim(evictable)

    def set_quotas(self, quotas: dict[int, int]) -> None:
        """Split the budget per layer (ExpertFlow PLEC); an empty dict pools it again."""
        self.quotas = dict(quotas)

    async def make_room(self, protect: set[ExpertKey]) -> None:
        """Wait until one block is free: evict, or cancel an unneeded prefetch, or wait for change."""
        while not self._room_now(protect):
            for key, entry in list(self.entries.items()):
                if entry.prefetched and key not in protect and self.cancel_load(key):
                    return
            await self.wait_change()

    def _forget(self, key: ExpertKey) -> Entry | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.layer_count[key[0]] -= 1
        return entry

    def evict(self, key: ExpertKey) -> None:
        entry = self._forget(key)
        assert entry is not None and entry.pins == 0 and entry.state is EntryState.READY
        self.tier.allocator.free(entry.handle)
        self.policy.on_evict(key)
        self.counters.evictions += 1
        if entry.prefetched:
            self.counters.prefetch_wasted += 1

    async def aclose(self) -> None:
        """Drop every entry; in-flight loads are cancelled or awaited so no block stays allocated."""
        for key, entry in list(self.entries.items()):
            if entry.state is not EntryState.READY and entry.ticket is not None:
                if not self.source.cancel(entry.ticket):
                    await entry.ticket.wait_done()
            current = self._forget(key)
            if current is not None and current.state is EntryState.READY:
                self.tier.allocator.free(current.handle)
        self._views.clear()
        await self.source.aclose()


def usable(entry: Entry) -> bool:
    """Its bytes may be computed on: resident, or (device) its copy is queued before use."""
    return entry.state in USABLE_STATES


def protect_set(protect: Iterable[ExpertKey], key: ExpertKey) -> set[ExpertKey]:
    s = set(protect)
    s.add(key)
    return s

"""The expert cache: which experts hold a block of the fast tier, loading, pinning, eviction, and
handing one layer's experts to compute (`fetch`). The only caller of the eviction policy."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable

import torch

from moeflow import _core
from moeflow.memory.device import ComputeDevice
from moeflow.memory.entries import (
    DEMAND,
    USABLE_STATES,
    CacheCounters,
    Entry,
    EntryState,
    PrefetchPlan,
    protect_set,
    usable,
)
from moeflow.memory.fetch import LayerFetch
from moeflow.memory.policies import EvictionPolicy, Evictable, ExpertKey
from moeflow.memory.sources import Source, Ticket
from moeflow.memory.tiers import DeviceTier, FastTier
from moeflow.memory.transfers import AsyncTransfers
from moeflow.store.layout import ExpertView

Tier = FastTier | DeviceTier

# A speculative load may only evict an expert idle for this many steps (not used by the step
# running nor the one before): recent experts are the likeliest to be needed again, and
# trading them for a guess thrashes a small cache.
SPECULATIVE_MIN_IDLE_STEPS = 2


class ExpertCache:
    """Maps (layer, expert) to a block of the fast tier.

    Invariants: an entry is in `entries` from the moment its block is allocated until it is
    evicted; a pinned entry (pins > 0) is never evicted; a LOADING entry's block is owned by
    its transfer, which frees it if the load fails or is cancelled. On a device tier, a copy
    into a block waits for the compute that last read the block (its entry's fence).
    """

    def __init__(self, tier: Tier, source: Source, transfers: AsyncTransfers, policy: EvictionPolicy,
                 device: ComputeDevice | None = None) -> None:
        self.tier = tier
        self.source = source
        self.transfers = transfers
        self.policy = policy
        self.device = device if device is not None else ComputeDevice()
        self._fenced = self.device.needs_fences and tier.kind == "device"
        self._checked = self.device.kind == "sim" and tier.kind == "device"
        self.size_class = tier.allocator.add_class(source.layout.size)
        self.block_bytes = source.layout.size
        self.entries: dict[ExpertKey, Entry] = {}
        self.counters = CacheCounters()
        self._changed = asyncio.Event()
        self._views: dict[int, ExpertView] = {}
        self._fences: dict[int, _core.CudaEvent] = {}  # block offset -> fence of its last reader
        self._released: list[Entry] = []  # released since the last fence
        self.quotas: dict[int, int] = {}
        self.layer_count: dict[int, int] = {}
        self.step = 0
        self._speculative = 0  # prefetched loads still in flight
        self._draining = 0  # cancelled loads whose blocks the core has not freed yet
        # MoE layers whose experts are computed where they live and never loaded here (cpu_layers)
        self.host_layers: frozenset[int] = frozenset()

    # ---- queries -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.tier.slots

    def state(self, key: ExpertKey) -> EntryState | None:
        entry = self.entries.get(key)
        return entry.state if entry is not None else None

    def entry(self, key: ExpertKey) -> Entry | None:
        return self.entries.get(key)

    def resident(self) -> list[ExpertKey]:
        # list(): one C-level copy, so stats() may read it from another thread mid-step
        return [k for k, e in list(self.entries.items()) if e.state is EntryState.READY]

    def loading(self) -> int:
        return sum(1 for e in list(self.entries.values()) if e.state is not EntryState.READY)

    def pinned_blocks(self) -> int:
        return sum(1 for e in list(self.entries.values()) if e.pins > 0)

    def queued_bytes(self) -> int:
        """Bytes a demand load submitted now would wait behind: the demand loads not landed yet
        and the copies already issued to the copy stream (prefetches still queued are passed)."""
        return self.block_bytes * sum(
            1 for e in self.entries.values()
            if e.state is not EntryState.READY and (e.priority == DEMAND or e.state is EntryState.ISSUED))

    # ---- what the policy hears (from here only) ----------------------------------------------
    def begin_step(self) -> None:
        """A forward step begins (for the recency of speculative evictions)."""
        self.step += 1
        self.policy.on_token()

    def begin_request(self) -> None:
        self.policy.on_request()

    def on_route(self, layer: int, logits: torch.Tensor) -> None:
        self.policy.on_route(layer, logits)

    def note_low_precision(self, key: ExpertKey) -> None:
        self.policy.on_low_precision_use(key)

    # ---- handing experts to compute ----------------------------------------------------------
    def fetch(self, layer: int, experts: list[int]) -> LayerFetch:
        """The experts of one layer in the order they can run (see LayerFetch); `close()` it."""
        return LayerFetch(self, layer, experts)

    def take_resident(self, layer: int, experts: list[int]) -> list[ExpertView] | None:
        """All of a layer's experts pinned as hits when every one has landed (the common
        decode case: no waiting, no task switch); None, touching nothing, otherwise."""
        entries = []
        for e in experts:
            entry = self.entries.get((layer, e))
            if entry is None or entry.state is not EntryState.READY:
                return None
            entries.append(entry)
        views: list[ExpertView] = []
        try:
            for entry in entries:
                views.append(self.pin(entry, "hit"))
        except BaseException:
            for entry in entries[: len(views)]:
                self.release(entry.key)
            raise
        return views

    def pin(self, entry: Entry, use: str) -> ExpertView:
        """Pin a usable entry for the current layer, counting `use` ("hit", "inflight" or
        "miss"). An ISSUED entry makes compute wait on its copy event (on a GPU the CPU goes on)."""
        assert usable(entry) and entry.weights is not None
        if entry.state is EntryState.ISSUED and entry.ticket is not None and entry.ticket.event is not None:
            self.device.wait(entry.ticket.event)
        if self._checked:
            self.device.before_read(entry.address, self.block_bytes)
        entry.pins += 1
        entry.last_step = self.step
        c = self.counters
        if use == "hit":
            c.hits += 1
        elif use == "inflight":
            c.inflight_hits += 1
        else:
            c.misses += 1
        if entry.prefetched:
            entry.prefetched = False
            c.prefetch_used += 1
        self.policy.on_access(entry.key)
        return entry.weights

    def release(self, key: ExpertKey) -> None:
        entry = self.entries[key]
        if entry.pins <= 0:
            raise RuntimeError(f"expert {key} released more often than acquired")
        entry.pins -= 1
        if entry.pins == 0:
            if self._fenced:
                self._released.append(entry)
            if entry.error is not None:
                self._drop_failed(entry)
            self._changed.set()

    def fence_released(self) -> None:
        """Record one event after the compute queued on the experts released since the last
        call (a layer's worth): a copy that later reuses one of their blocks waits on it."""
        if not self._released:
            return
        fence = self.device.fence()
        for entry in self._released:
            entry.fence = fence
        self._released.clear()

    async def acquire(self, key: ExpertKey, protect: Iterable[ExpertKey] = ()) -> Entry:
        """Pin one expert, loading it at demand priority when needed (the host cache of the
        three-tier configuration uses this to feed device copies)."""
        entry = self.entries.get(key)
        if entry is not None and entry.state is EntryState.READY:
            self.pin(entry, "hit")
            return entry
        started = time.perf_counter()
        try:
            while True:
                entry, use = await self.ensure_loading(key, protect)
                await self.wait_landed(entry)
                if self.entries.get(key) is entry and entry.state is EntryState.READY:
                    self.pin(entry, use)
                    return entry
        finally:
            self.counters.stall_seconds += time.perf_counter() - started

    async def ensure_loading(self, key: ExpertKey, protect: Iterable[ExpertKey] = ()) -> tuple[Entry, str]:
        """The entry of `key` and how the caller found it ("hit": landed, "inflight": a prefetch
        on its way, "miss"), submitting a demand load (after making room) when absent; a load
        in flight is promoted to demand priority."""
        first = True
        while True:
            entry = self.entries.get(key)
            if entry is not None:
                if entry.state is EntryState.READY:
                    return entry, "hit" if first else "miss"
                self._promote(entry)
                return entry, "inflight" if first and entry.prefetched else "miss"
            first = False
            await self.make_room(protect_set(protect, key))
            if key not in self.entries:
                return self._submit(key, DEMAND, prefetched=False), "miss"

    async def wait_landed(self, entry: Entry) -> None:
        """Wait for an entry's transfer to finish; raise its (described) error if it failed."""
        ticket = entry.ticket
        if entry.state is EntryState.READY or ticket is None:
            return
        await ticket.wait_done()
        if entry.error is not None:
            raise entry.error
        error = ticket.error()
        if error is not None:  # cancelled, or the engine closed
            raise self.source.describe(entry.key, error) from error

    async def wait_change(self) -> None:
        """Wait until a load is issued, finishes or fails, or an expert is released or evicted."""
        self._changed.clear()
        await self._changed.wait()

    # ---- loading ---------------------------------------------------------------------------
    def apply(self, plan: PrefetchPlan) -> set[ExpertKey]:
        """Carry out a scheduler's plan; returns the keys whose loads started."""
        self.settle(plan)
        return self.load(plan)

    def settle(self, plan: PrefetchPlan) -> None:
        """The plan's cancellations and quotas only (before a layer's demand loads)."""
        for key in plan.cancel:
            self.cancel_load(key)
        if plan.quotas is not None:
            self.quotas = dict(plan.quotas)

    def load(self, plan: PrefetchPlan) -> set[ExpertKey]:
        """The plan's loads only (after a layer's demand loads); returns the keys whose loads started."""
        started: set[ExpertKey] = set()
        protect = set(plan.protect)
        host_layers = self.host_layers
        for key, priority in plan.loads:
            if host_layers and key[0] in host_layers:
                continue  # computed where it lives: never loaded
            protect.add(key)
            if key not in self.entries and priority != DEMAND and self._speculative >= plan.max_speculative:
                break
            if self.start_load(key, priority, protect):
                started.add(key)
            elif key not in self.entries:
                break  # no room without evicting something nearer: stop
        return started

    def start_load(self, key: ExpertKey, priority: int, protect: Iterable[ExpertKey] = ()) -> bool:
        """Begin loading `key` without waiting (prefetch or an early demand load).

        Returns False when it is already present or no block can be had without evicting
        a pinned or protected expert (a prefetch never does that)."""
        entry = self.entries.get(key)
        if entry is not None:
            if entry.state is not EntryState.READY and priority < entry.priority:
                self._promote(entry, priority)
            return False
        if key[0] in self.host_layers:
            return False
        speculative = priority != DEMAND
        min_idle = SPECULATIVE_MIN_IDLE_STEPS if speculative else 0
        if not self._room_now(protect_set(protect, key), min_idle):
            return False
        self._submit(key, priority, prefetched=speculative)
        return True

    def cancel_load(self, key: ExpertKey) -> bool:
        """Cancel a queued prefetch nobody is waiting for; True when it never ran and its block is free."""
        entry = self.entries.get(key)
        if (entry is None or entry.state is EntryState.READY or entry.pins or entry.ticket is None
                or not entry.prefetched):
            return False
        if not self.source.cancel(entry.ticket):
            return False
        self._forget(key)
        # Its block is free only once the cancelled completion arrives (a device copy cancelled
        # after some parts were issued lets them land first): count it as taken until then.
        entry.cancelled = True
        self._draining += 1
        self.counters.prefetch_cancelled += 1
        self.counters.prefetch_wasted += 1
        self._changed.set()
        return True

    def _submit(self, key: ExpertKey, priority: int, *, prefetched: bool) -> Entry:
        allocator = self.tier.allocator
        handle = allocator.alloc(self.size_class)
        # kept after use: a cancelled load never waited on it, and the block's next copy must
        after = self._fences.get(handle.offset)
        address = allocator.address(handle)  # before the load owns the block (it may fail at once)
        try:
            ticket = self.source.submit(key, allocator, handle, priority, after)
        except BaseException:
            allocator.free(handle)
            raise
        entry = Entry(key, handle, EntryState.LOADING, address, ticket, prefetched=prefetched,
                      priority=priority, submitted_speculative=prefetched)
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
            try:
                entry.weights = self._weights(entry.handle)
            except Exception:
                return  # stays loading: `_on_loaded` meets the same error and reports it
            entry.state = EntryState.ISSUED
            self._changed.set()

    def _on_loaded(self, entry: Entry, ticket: Ticket) -> None:
        """Land a finished load, or record why it failed. Never raises: an exception here would
        leave the entry loading forever and its waiters with it."""
        self._changed.set()
        if entry.submitted_speculative:
            self._speculative -= 1
        if self.entries.get(entry.key) is not entry:
            if entry.cancelled:  # the core has freed its block now
                entry.cancelled = False
                self._draining -= 1
            return
        error = ticket.error()
        if error is None:
            try:
                self._land(entry, ticket.completion())
                return
            except Exception as exc:  # a layout that does not fit the bytes, a broken policy
                error = exc
        entry.state, entry.weights = EntryState.LOADING, None  # never handed out again
        entry.error = self.source.describe(entry.key, error)  # typed: names file, layer, expert
        self.counters.load_errors += 1
        if entry.pins == 0:  # else compute still reads it (a device copy used once issued): see release
            self._drop_failed(entry)

    def _drop_failed(self, entry: Entry) -> None:
        """Forget a failed entry (a retry reloads); give back its block if it landed (else the core freed it)."""
        self._forget(entry.key)
        if entry.ticket is not None and entry.ticket.error() is None:
            self._give_back(entry)

    def _land(self, entry: Entry, completion: _core.Completion) -> None:
        if completion.bytes != self.block_bytes:
            raise ValueError(f"{completion.bytes} bytes landed, the expert's block holds {self.block_bytes}")
        weights = self._weights(entry.handle)
        self.policy.on_insert(entry.key)
        entry.state, entry.weights = EntryState.READY, weights
        self.counters.loads += 1
        self.counters.bytes_loaded += completion.bytes
        self.counters.load_seconds += completion.nanos * 1e-9

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
        if len(self.entries) + self._draining < self.capacity:
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

    async def make_room(self, protect: set[ExpertKey]) -> None:
        """Wait until one block is free: evict, or cancel an unneeded prefetch (its block comes
        back with its completion), or wait for a change."""
        while not self._room_now(protect):
            for key in list(self.entries):
                if key not in protect and self.cancel_load(key):
                    break
            await self.wait_change()

    def _forget(self, key: ExpertKey) -> Entry | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.layer_count[key[0]] -= 1
        return entry

    def evict(self, key: ExpertKey) -> None:
        entry = self._forget(key)
        assert entry is not None and entry.pins == 0 and entry.state is EntryState.READY
        self._give_back(entry)
        self.policy.on_evict(key)
        self.counters.evictions += 1
        if entry.prefetched:
            self.counters.prefetch_wasted += 1

    def _give_back(self, entry: Entry) -> None:
        """Free a forgotten entry's block; the next copy into it waits for the compute that read it."""
        if entry in self._released:  # read by compute queued after the last fence
            self.fence_released()
        if entry.fence is not None:
            self._fences[entry.handle.offset] = entry.fence
        self.tier.allocator.free(entry.handle)

    async def aclose(self) -> None:
        """Drop every entry; in-flight loads are cancelled or awaited so no block stays allocated."""
        for key, entry in list(self.entries.items()):
            if entry.state is not EntryState.READY and entry.ticket is not None:
                # A device copy cancelled after some of its parts were issued ends once those
                # landed; until then it holds its source block (the pinned home's) too.
                self.source.cancel(entry.ticket)
                await entry.ticket.wait_done()
            current = self._forget(key)
            if current is not None and current.state is EntryState.READY:
                self.tier.allocator.free(current.handle)
        self._views.clear()
        self._fences.clear()
        self._released.clear()
        await self.source.aclose()


__all__ = ["USABLE_STATES", "ExpertCache", "Tier", "usable"]

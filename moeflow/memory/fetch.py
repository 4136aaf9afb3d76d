"""One layer's experts handed to compute as each becomes usable: resident, then in flight, then
missing (made by `ExpertCache.fetch`, which owns it)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from moeflow.memory.entries import DEMAND, Entry, EntryState, usable
from moeflow.memory.policies import ExpertKey
from moeflow.store.layout import ExpertView

if TYPE_CHECKING:
    from moeflow.memory.cache import ExpertCache


class LayerFetch:
    """The experts one MoE layer needs, in the order they can run (ProMoE): resident first,
    then in flight, then missing. Each expert handed out is pinned until `release`.

    How each expert was found when the layer asked decides how its use counts: landed -> hit,
    a prefetch in flight -> in-flight hit, absent -> miss. Missing experts are loaded at demand
    priority as soon as the fetch starts, as far as the budget allows without evicting this
    layer's own experts; more start as the layer releases experts it has run. Always
    `close()`: it releases whatever is still held and fences the released blocks.
    """

    def __init__(self, cache: ExpertCache, layer: int, experts: list[int]) -> None:
        self.cache = cache
        self.layer = layer
        self.pending = list(experts)
        self.keys = {(layer, e) for e in experts}
        self.held: list[int] = []
        self.use: dict[int, str] = {}
        self._watch: dict[int, Entry] = {}
        for e in experts:
            entry = cache.entry((layer, e))
            if entry is None:
                self.use[e] = "miss"
            elif entry.state is EntryState.READY:
                self.use[e] = "hit"
            else:
                self.use[e] = "inflight" if entry.prefetched else "miss"

    def _key(self, expert: int) -> ExpertKey:
        return (self.layer, expert)

    def start(self) -> None:
        """Submit demand loads for the missing experts that fit now (no waiting)."""
        cache = self.cache
        for e in self.pending:
            key = self._key(e)
            entry = cache.entry(key)
            if entry is not None and usable(entry):
                continue
            cache.start_load(key, DEMAND, self.keys)
            entry = cache.entry(key)  # just started or already loading
            if entry is None:
                break  # no room until this layer releases an expert
            self._watch[e] = entry

    def _take_usable(self) -> tuple[int, ExpertView] | None:
        cache = self.cache
        for e in self.pending:
            entry = cache.entry(self._key(e))
            if entry is not None and usable(entry):
                weights = cache.pin(entry, self.use[e])  # may raise (a device hazard): then not held
                self.pending.remove(e)
                self.held.append(e)
                return e, weights
        return None

    def _raise_failed(self) -> None:
        """Raise the typed error of a watched demand load that failed; forget a guess's load
        that failed (a prefetch never fails a request: the layer loads the expert itself, and
        only that load's failure is the request's) and one cancelled or evicted meanwhile (the
        expert is loaded again)."""
        for e, entry in list(self._watch.items()):
            if e in self.pending and entry.error is not None:
                if entry.submitted_speculative:
                    del self._watch[e]
                    continue
                raise entry.error
            if e in self.pending and self.cache.entry(self._key(e)) is not entry:
                del self._watch[e]

    async def next(self) -> tuple[int, ExpertView] | None:
        """The next expert to run and its pinned weights; None when the layer has them all."""
        if not self.pending:
            return None
        ready = self._take_usable()
        if ready is not None:
            return ready
        cache = self.cache
        cache.transfers.poll()  # loads that finished while this layer computed
        ready = self._take_usable()
        if ready is not None:
            return ready
        started = time.perf_counter()
        try:
            while True:
                self._raise_failed()
                in_flight = False
                for e in self.pending:
                    entry = cache.entry(self._key(e))
                    in_flight = in_flight or (entry is not None and not usable(entry))
                if not in_flight:
                    # Nothing of ours in flight: load the first missing expert, waiting for room.
                    e = self.pending[0]
                    self._watch[e], _ = await cache.ensure_loading(self._key(e), self.keys)
                else:
                    await cache.wait_change()
                ready = self._take_usable()
                if ready is not None:
                    return ready
        finally:
            cache.counters.stall_seconds += time.perf_counter() - started

    def release(self, expert: int) -> None:
        """The layer is done with `expert`: unpin it and start loads that now fit."""
        self.held.remove(expert)
        self.keys.discard(self._key(expert))  # done: it may be evicted to make room for the rest
        self.cache.release(self._key(expert))
        if self.pending:
            self.start()

    def close(self) -> None:
        for e in self.held:
            self.cache.release(self._key(e))
        self.held.clear()
        self.cache.fence_released()

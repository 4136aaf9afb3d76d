"""Handing one layer's experts to the executor as each becomes available (resident, in flight, missing)."""

from __future__ import annotations

import time

from moeflow.memory.cache import DEMAND, USABLE_STATES, Entry, EntryState, ExpertCache, usable
from moeflow.memory.policies import ExpertKey
from moeflow.store.layout import ExpertView


class LayerFetch:
    """The experts one MoE layer needs, in the order they can run (ProMoE): resident first,
    then in flight, then missing. Each expert handed out is pinned until `release`.

    Missing experts are loaded at demand priority as soon as the fetch starts, as far as
    the budget allows without evicting this layer's own experts; more start as the layer
    releases experts it has run. Always `close()` (it releases whatever is still held).
    """

    def __init__(self, cache: ExpertCache, layer: int, experts: list[int]) -> None:
        self.cache = cache
        self.layer = layer
        self.pending = list(experts)
        self.keys = {(layer, e) for e in experts}
        self.held: list[int] = []
        self._missed: set[int] = set()
        self._watch: dict[int, Entry] = {}

    def _key(self, expert: int) -> ExpertKey:
        return (self.layer, expert)

    def start(self) -> None:
        """Submit demand loads for the missing experts that fit now (no waiting)."""
        cache = self.cache
        for e in self.pending:
            key = self._key(e)
            if cache.state(key) in USABLE_STATES:
                continue
            self._missed.add(e)
            if not cache.start_load(key, DEMAND, self.keys) and cache.state(key) is None:
                break  # no room until this layer releases an expert
            self._watch[e] = cache.entries[key]

    def _take_ready(self) -> tuple[int, ExpertView] | None:
        cache = self.cache
        for e in self.pending:
            entry = cache.entries.get(self._key(e))
            if entry is not None and usable(entry):
                self.pending.remove(e)
                self.held.append(e)
                return e, cache.pin(entry, hit=e not in self._missed)
        return None

    def _raise_failed(self) -> None:
        for e, entry in self._watch.items():
            if e in self.pending and self.cache.entries.get(self._key(e)) is not entry:
                ticket = entry.ticket
                error = ticket.error() if ticket is not None and ticket.done() else None
                if error is not None:
                    raise self.cache.describe(self._key(e), error)

    async def next(self) -> tuple[int, ExpertView] | None:
        """The next expert to run and its pinned weights; None when the layer has them all."""
        if not self.pending:
            return None
        ready = self._take_ready()
        if ready is not None:
            return ready
        cache = self.cache
        cache.transfers.poll()  # loads that finished while this layer computed
        ready = self._take_ready()
        if ready is not None:
            return ready
        started = time.perf_counter()
        try:
            while True:
                self._raise_failed()
                if not any(cache.state(self._key(e)) is EntryState.LOADING for e in self.pending):
                    # Nothing of ours in flight: load the first missing expert, waiting for room.
                    e = self.pending[0]
                    self._missed.add(e)
                    self._watch[e] = await cache.ensure_loading(self._key(e), self.keys)
                else:
                    await cache.wait_change()
                ready = self._take_ready()
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


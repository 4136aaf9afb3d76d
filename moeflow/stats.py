"""Statistics records: frozen, readable as attributes or as a mapping, convertible with as_dict()."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moeflow.memory.entries import CacheCounters

_COUNTERS = (
    "hits",
    "misses",
    "inflight_hits",
    "loads",
    "bytes_loaded",
    "load_seconds",
    "stall_seconds",
    "evictions",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_wasted",
    "prefetch_cancelled",
    "load_errors",
)


def counters_dict(c: CacheCounters) -> dict[str, Any]:
    return {name: getattr(c, name) for name in _COUNTERS}


def expert_use_share(device_hits: int, copied: int, cpu: int, low_precision: int) -> dict[str, float]:
    """Where expert uses ran, as shares of all uses: resident on the device (hits, in-flight hits),
    copied on a miss, computed on the CPU from the host home, or a low-precision copy (HOBBIT)."""
    total = device_hits + copied + cpu + low_precision
    ways = {"device_hit": device_hits, "copied": copied, "cpu": cpu, "low_precision": low_precision}
    return {way: n / total if total else 0.0 for way, n in ways.items()}


class _Record(Mapping[str, Any]):
    """A frozen mapping of named figures (stats()['hits'] and stats().hits both work)."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


def _derived(d: dict[str, Any], tokens: int) -> dict[str, Any]:
    uses = d["hits"] + d["inflight_hits"] + d["misses"]
    d["hit_rate"] = d["hits"] / uses if uses else 0.0
    d["stall_seconds_per_token"] = d["stall_seconds"] / tokens if tokens else 0.0
    d["bytes_loaded_per_token"] = d["bytes_loaded"] / tokens if tokens else 0.0
    return d


class EngineStats(_Record):
    """Engine-wide figures since open."""

    @classmethod
    def build(cls, counters: dict[str, Any], *, tokens: int, **fields: Any) -> EngineStats:
        d = dict(counters)
        d["tokens"] = tokens
        d.update(fields)
        return cls(_derived(d, tokens))


class RequestStats(_Record):
    """Figures of one request (the steps it ran)."""

    @staticmethod
    def builder() -> _RequestStatsBuilder:
        return _RequestStatsBuilder()


def counter_delta(after: CacheCounters, before: CacheCounters) -> dict[str, float]:
    """What changed between two snapshots of the cache counters."""
    return {name: getattr(after, name) - getattr(before, name) for name in _COUNTERS}


@dataclass
class _RequestStatsBuilder:
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    host_syncs: int = 0
    prefill_host_syncs: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    prefill: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def add_step(self, after: CacheCounters, before: CacheCounters, seconds: float, host_syncs: int = 0) -> None:
        """One step: the counters' change, its wall time (token readback included) and its
        blocking device reads."""
        self.add_delta(counter_delta(after, before), seconds, host_syncs)

    def add_delta(self, delta: dict[str, float], seconds: float, host_syncs: int = 0) -> None:
        """One step given as the counters' change (see `counter_delta`)."""
        for name in _COUNTERS:
            self.totals[name] += delta.get(name, 0)
        self.host_syncs += host_syncs
        if self.steps == 0:
            self.prefill_seconds = seconds
            self.prefill = dict(self.totals)
            self.prefill_host_syncs = host_syncs
        self.seconds += seconds
        self.steps += 1

    def freeze(self, tokens: int) -> RequestStats:
        d: dict[str, Any] = dict(self.totals)
        d["tokens"] = tokens
        d["seconds"] = self.seconds
        d["prefill_seconds"] = self.prefill_seconds
        decode = self.seconds - self.prefill_seconds
        d["decode_seconds"] = decode
        d["decode_tokens_per_second"] = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
        # The decode steps alone (the prefill step loads most experts of every layer):
        decoded = max(tokens - 1, 0)
        for name in ("hits", "inflight_hits", "misses", "stall_seconds", "bytes_loaded", "load_seconds"):
            d[f"decode_{name}"] = d[name] - self.prefill.get(name, 0)
        d["host_syncs"] = self.host_syncs
        d["host_syncs_per_token"] = (self.host_syncs - self.prefill_host_syncs) / decoded if decoded else 0.0
        uses = d["decode_hits"] + d["decode_inflight_hits"] + d["decode_misses"]
        d["decode_hit_rate"] = d["decode_hits"] / uses if uses else 0.0
        d["decode_stall_seconds_per_token"] = d["decode_stall_seconds"] / decoded if decoded else 0.0
        d["decode_bytes_loaded_per_token"] = d["decode_bytes_loaded"] / decoded if decoded else 0.0
        load = d["decode_load_seconds"]  # hidden transfer time / transfer time, decode steps only
        d["decode_overlap_fraction"] = max(0.0, 1 - min(d["decode_stall_seconds"], load) / load) if load > 0 else 1.0
        return RequestStats(_derived(d, tokens))

"""The server's Prometheus metrics: its own request counters plus the engine's, read from stats() at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# engine stats field -> (metric name, help, counter?)
_ENGINE_FIELDS = {
    "hit_rate": ("moeflow_expert_hit_rate", "expert cache hits / lookups since open", False),
    "stall_seconds": ("moeflow_stall_seconds", "seconds compute waited for expert loads", True),
    "bytes_loaded": ("moeflow_bytes_loaded", "expert bytes copied into the fast tier", True),
    "host_syncs": ("moeflow_host_syncs", "blocking device-to-host reads", True),
    "tokens": ("moeflow_engine_tokens", "tokens the engine generated (all callers)", True),
    "requests": ("moeflow_engine_requests", "requests the engine started (all callers)", True),
    "pinned_blocks": ("moeflow_pinned_blocks", "expert blocks pinned by running steps", False),
    "resident_experts": ("moeflow_resident_experts", "experts in the fast tier", False),
}


class _EngineCollector(Collector):
    """Yields the engine figures of the last snapshot (taken by the /metrics handler on the
    engine thread, so the scrape never reads the cache while a step changes it)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}
        self.queue_depth = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("moeflow_queue_depth", "sequences waiting for an engine step",
                                value=self.queue_depth)
        for field, (name, help_, counter) in _ENGINE_FIELDS.items():
            value = self.snapshot.get(field)
            if value is None:
                continue
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, help_, value=float(value))


class ServerMetrics:
    """One registry per app, so several apps in a process (tests, embedders) never share counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moeflow_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.finished = Counter("moeflow_completions_finished", "completion choices by how they ended",
                                ["finish_reason"], registry=self.registry)
        self.completion_tokens = Counter("moeflow_completion_tokens", "tokens generated for served requests",
                                         registry=self.registry)
        self.prompt_tokens = Counter("moeflow_prompt_tokens", "prompt tokens of served requests",
                                     registry=self.registry)
        self.in_flight = Gauge("moeflow_requests_in_flight", "completion requests being served",
                               registry=self.registry)
        self.engine = _EngineCollector()
        self.registry.register(self.engine)

    def render(self, snapshot: dict[str, Any], queue_depth: int) -> bytes:
        self.engine.snapshot = snapshot
        self.engine.queue_depth = queue_depth
        return generate_latest(self.registry)

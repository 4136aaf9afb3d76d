"""Where each missing expert of a layer runs: wait for its copy, compute it on the CPU from its host
home, or load a low-precision copy (HOBBIT), by a cost model of the link, the CPU and the tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Way = Literal["copy", "cpu", "low"]


@dataclass(frozen=True)
class CpuSpeed:
    """One expert on the CPU takes `seconds_fixed + rows * seconds_per_row` (calibrated at open on
    a real expert of the store: see runtime/cpu_experts.py calibrate)."""

    seconds_fixed: float
    seconds_per_row: float

    def seconds(self, rows: int) -> float:
        return self.seconds_fixed + rows * self.seconds_per_row


@dataclass(frozen=True)
class LinkSpeed:
    """The host -> device link: bytes per second, a latency per copy, and where the figure came from."""

    bytes_per_second: float
    latency_seconds: float
    source: str

    def seconds(self, nbytes: int) -> float:
        return self.latency_seconds + nbytes / self.bytes_per_second


@dataclass(frozen=True)
class Miss:
    """A missing expert of the layer: the token rows routed to it, and its copy's bytes (the
    full-precision block, or the low-precision block where HOBBIT would load that instead)."""

    expert: int
    rows: int
    copy_bytes: int
    low: bool = False


def place(misses: list[Miss], cpu: CpuSpeed, link: LinkSpeed, queued_bytes: int) -> dict[int, Way]:
    """The way out for each miss that finishes the layer's misses soonest (HybriMoE's split, cut
    down to one choice): the k lightest misses (fewest rows) run on the CPU one after another
    while the others are copied one after another behind `queued_bytes` already on the link;
    k minimises the later of the two timelines. Ties go to copying, which also warms the cache
    for the next tokens. Device compute is left out: on a GPU it is far below either timeline.
    Single decode tokens favour the CPU (a few microseconds of rows against a whole expert's
    bytes); a prefill chunk's hundreds of rows favour the copy."""
    order = sorted(misses, key=lambda m: (m.rows, m.expert))  # lightest first to the CPU
    ahead = queued_bytes / link.bytes_per_second
    # copy_tail[k]: link finish time when order[k:] are copied
    copy_tail = [0.0] * (len(order) + 1)
    for k in range(len(order) - 1, -1, -1):
        copy_tail[k] = copy_tail[k + 1] + link.seconds(order[k].copy_bytes)
    best_k, best = 0, (ahead + copy_tail[0]) if order else 0.0
    cpu_time = 0.0
    for k, miss in enumerate(order, start=1):
        cpu_time += cpu.seconds(miss.rows)
        link_time = ahead + copy_tail[k] if k < len(order) else 0.0
        finish = max(cpu_time, link_time)
        if finish < best:
            best_k, best = k, finish
    ways: dict[int, Way] = {}
    for k, miss in enumerate(order):
        ways[miss.expert] = "cpu" if k < best_k else ("low" if miss.low else "copy")
    return ways


def resolve_cpu_layers(spec: int | tuple[int, ...], moe_layers: tuple[int, ...]) -> frozenset[int]:
    """The MoE layer indices whose experts always run on the CPU; ValueError naming a layer that
    is not a MoE layer, or a count beyond the model's MoE layers."""
    if isinstance(spec, int):
        if spec > len(moe_layers):
            raise ValueError(f"the model has {len(moe_layers)} MoE layers")
        return frozenset(moe_layers[:spec])
    wrong = sorted(set(spec) - set(moe_layers))
    if wrong:
        raise ValueError(f"layer(s) {', '.join(map(str, wrong))} are not MoE layers of this model "
                         f"(its MoE layers: {', '.join(map(str, moe_layers))})")
    return frozenset(spec)

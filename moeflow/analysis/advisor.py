"""`moeflow analyze`: does a model suit offloading, and how big a budget does it want (MoE-LRC)?

From routing traces it reports, per MoE layer, SRP and SCH at segment lengths 4, 16, 64 and 256,
with LRU, LFU and Belady hit rates at the same cache sizes (multiples of top-k, per layer), the
cache size where SCH flattens, and the budget that follows (as `--expert-budget` flags to paste);
and, where matplotlib is installed, plots hit rate against cache size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.analysis.locality import belady, flattening_point, lfu, lru, sch, srp
from moeflow.config import Budget
from moeflow.scheduling.traces import SequenceTrace, TraceHeader

SEGMENTS = (4, 16, 64, 256)


@dataclass(frozen=True)
class LayerReport:
    layer: int
    srp: dict[int, float | None]  # segment -> SRP (None: no sequence that long)
    sizes: list[int]  # cache sizes (experts of this layer)
    sch: dict[int, list[float]]  # segment -> hit rate per size
    lru: list[float]
    lfu: list[float]
    belady: list[float]
    flattens_at: int  # experts: where SCH (segment 16) flattens


def cache_sizes(num_experts: int, top_k: int) -> list[int]:
    """k, 1.5k, 2k, 3k, 4k, 6k, 8k, ... capped at E (per-layer cache sizes)."""
    sizes: list[int] = []
    mult = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    for m in mult:
        size = min(num_experts, max(top_k, round(m * top_k)))
        if not sizes or size > sizes[-1]:
            sizes.append(size)
    return sizes


def analyze(header: TraceHeader, traces: list[SequenceTrace]) -> list[LayerReport]:
    k, e = header.top_k, header.num_experts
    sizes = cache_sizes(e, k)
    reports = []
    for layer in header.moe_layers:
        routes = [t.layer_route(layer) for t in traces]
        routes = [r for r in routes if r]
        stream = [tok for r in routes for tok in r]  # the cache lives across requests
        sch_by_segment = {s: sch(stream, s, sizes) for s in SEGMENTS}
        reports.append(
            LayerReport(
                layer=layer,
                srp={s: srp(routes, s, k) if any(len(r) >= s for r in routes) else None for s in SEGMENTS},
                sizes=sizes,
                sch=sch_by_segment,
                lru=lru(stream, sizes),
                lfu=lfu(stream, sizes),
                belady=belady(stream, sizes),
                flattens_at=flattening_point(sizes, sch_by_segment[16]),
            )
        )
    return reports


def budget_flags(experts: int, total: int, block_bytes: int) -> tuple[str, str]:
    """`--expert-budget` flags to paste that give at least `experts` slots: as a whole percentage
    (rounded up) and as a size (rounded up to 0.1 of its unit)."""
    percent = max(1, math.ceil(experts * 100 / total)) if total else 100
    # parse_budget reads "P%" as P / 100 of all experts' bytes; step up where float rounding loses a slot
    while percent < 100 and Budget(fraction=percent / 100).resolve(total * block_bytes) // block_bytes < experts:
        percent += 1
    need = experts * block_bytes
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if need >= scale:
            size = f"{math.ceil(need * 10 / scale) / 10:g}{unit}"
            break
    else:
        size = str(need)
    return f"--expert-budget {min(percent, 100)}%", f"--expert-budget {size}"


def summary(header: TraceHeader, reports: list[LayerReport], block_bytes: int) -> dict[str, Any]:
    experts = sum(r.flattens_at for r in reports)
    total = len(header.moe_layers) * header.num_experts
    flag, flag_bytes = budget_flags(experts, total, block_bytes)
    return {
        "model": header.model,
        "top_k": header.top_k,
        "num_experts": header.num_experts,
        "srp": {str(s): _mean_or_none([r.srp[s] for r in reports]) for s in SEGMENTS},
        "recommended_experts": experts,
        "recommended_fraction": round(experts / total, 4) if total else 0.0,
        "recommended_budget_bytes": experts * block_bytes,
        "recommended_flag": flag,
        "recommended_flag_bytes": flag_bytes,
        "layers": [
            {
                "layer": r.layer,
                "srp": {str(s): round(v, 4) if v is not None else None for s, v in r.srp.items()},
                "sizes": r.sizes,
                "sch": {str(s): [round(h, 4) for h in hs] for s, hs in r.sch.items()},
                "lru": [round(h, 4) for h in r.lru],
                "lfu": [round(h, 4) for h in r.lfu],
                "belady": [round(h, 4) for h in r.belady],
                "flattens_at": r.flattens_at,
            }
            for r in reports
        ],
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None


def plot(reports: list[LayerReport], top_k: int, out: str | Path, title: str) -> Path:
    """PNG of the layer-mean hit rate against cache size (in multiples of k) for each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = reports[0].sizes
    x = [s / top_k for s in sizes]

    def mean(curves: list[list[float]]) -> list[float]:
        return [sum(c[i] for c in curves) / len(curves) for i in range(len(sizes))]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for segment in SEGMENTS:
        ax.plot(x, mean([r.sch[segment] for r in reports]), marker="o", label=f"SCH (S={segment})")
    ax.plot(x, mean([r.lru for r in reports]), "k--", label="LRU")
    ax.plot(x, mean([r.lfu for r in reports]), "k:", label="LFU")
    ax.plot(x, mean([r.belady for r in reports]), "k-", linewidth=2, label="Belady")
    ax.set_xlabel("cache size per layer (multiples of top-k)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

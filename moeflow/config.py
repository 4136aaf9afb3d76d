"""Engine configuration: validated once at the edge (EngineConfig), sizes derived once (MemoryPlan)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from moeflow.errors import ConfigError

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

DEVICES = ("cpu", "cuda", "auto", "sim")  # sim: the simulated GPU, a test device
PREFETCHERS = ("auto", "predictor", "none", "last-token", "gate-lookahead", "eam", "expertflow")
BUDGET_SPLITS = ("pooled", "plec")
BATCH_ORDERS = ("regroup", "fifo")
DIRECT_IO = ("auto", "require", "never")
STORE_MODES = ("auto", "never", "rebuild")
# Names only: importing torch here would make `moeflow --help` wait seconds for it.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MISS_COMPUTE = ("copy", "cpu", "auto")  # where a missing expert runs (scheduling/placement.py)
POLICIES = ("lru", "lfu", "mrs", "hobbit", "shallow", "predicted")  # eviction policies (memory/policies.py)


def compute_dtypes() -> dict[str, torch.dtype]:
    """The compute dtypes by name."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


# expert_budget='auto' keeps back memory_reserve bytes for the KV cache and activations; unset, the
# reserve is 10% of the free memory and at least 1 GiB. Of the reserve, the KV cache gets this share
# (kv_budget, when the user set none); the rest is for activations (one prefill chunk's worth).
MIN_RESERVE = 1 << 30
KV_SHARE_OF_RESERVE = 0.75


def default_reserve(free_bytes: int) -> int:
    """The reserve expert_budget='auto' keeps when memory_reserve is unset: 10% of free, at least 1 GiB."""
    return max(MIN_RESERVE, free_bytes // 10)


@dataclass(frozen=True)
class Budget:
    """An expert budget: absolute bytes, a fraction of all experts' bytes, or 'auto' (what the
    fast tier has free, sized by the planner: memory/planner.py fit_budget)."""

    bytes: int | None = None
    fraction: float | None = None
    auto: bool = False

    def resolve(self, total_expert_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        if self.fraction is None:  # 'auto' is sized against free memory before any resolve
            raise ConfigError("expert_budget='auto' must be sized by the planner (plan_tiers) before use")
        return int(self.fraction * total_expert_bytes)

    def __str__(self) -> str:
        if self.auto:
            return "auto"
        return f"{self.fraction * 100:g}%" if self.fraction is not None else format_bytes(self.bytes or 0)


def parse_size(value: object, option: str = "size") -> int:
    """Bytes from an int or a string such as '512MiB', '2GiB', '1.5GB', '4096'."""
    if isinstance(value, bool):
        raise ConfigError(f"{option}={value!r}: expected a size such as '2GiB' or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{option}={value!r}: a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{option}={value!r}: cannot parse as a size (examples: 4096, '512MiB', '2GiB', '1.5GB')")


def parse_budget(value: object, option: str = "expert_budget", *, allow_auto: bool = True) -> Budget:
    """A Budget from bytes, a size string, a fraction in (0, 1], a percentage, or 'auto' (when allowed)."""
    if value is None:
        return Budget(fraction=1.0)
    if isinstance(value, str) and value.strip().lower() == "auto":
        if not allow_auto:
            raise ConfigError(f"{option}={value!r}: 'auto' applies to expert_budget only; give a size or a percentage")
        return Budget(auto=True)
    if isinstance(value, float) and not isinstance(value, bool):
        if 0 < value <= 1:
            return Budget(fraction=value)
        raise ConfigError(f"{option}={value!r}: a float budget is a fraction in (0, 1]")
    if isinstance(value, str):
        m = _PERCENT.match(value)
        if m:
            fraction = float(m.group(1)) / 100
            if not 0 < fraction <= 1:
                raise ConfigError(f"{option}={value!r}: a percentage must be in (0, 100]")
            return Budget(fraction=fraction)
    size = parse_size(value, option)
    if size <= 0:
        raise ConfigError(f"{option}={value!r}: the budget must be positive")
    return Budget(bytes=size)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _choice(option: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{option}={value!r}: expected one of {', '.join(allowed)}")
    return value


def _positive_int(option: str, value: object, most: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{option}={value!r}: expected a positive integer")
    if most is not None and value > most:
        raise ConfigError(f"{option}={value!r}: expected at most {most}{' (' + why + ')' if why else ''}")
    return value


MAX_IO_WORKERS = 256  # the transfer engine's own limit (rust/core/src/transfer.rs)
MAX_IO_CHUNK = 1 << 40  # a part of one read; the transfer engine takes it as a u64


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_cpu_layers(value: object) -> int | tuple[int, ...]:
    """cpu_layers as given: an int N >= 0 (the first N MoE layers, as llama.cpp's --n-cpu-moe) or
    a string of layer indices and ranges such as "0-3,7". Raises ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError("expected an int >= 0 or a string of layer indices such as '0-3,7'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a layer count cannot be negative")
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an int >= 0 or a string of layer indices such as '0-3,7'")
    layers: set[int] = set()
    for part in value.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a layer index or a range such as '0-3'")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"the range {part.strip()!r} runs backwards")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


@dataclass(frozen=True)
class EngineConfig:
    """Everything a user can set on an engine; build it with `EngineConfig.from_user(**kw)`."""

    expert_budget: Budget = Budget(fraction=1.0)
    host_budget: Budget | None = None  # GPU: pinned host memory for experts (default: all of them)
    device: str = "auto"
    prefetch: str = "auto"  # auto: expertflow when a trained predictor is present, else gate-lookahead
    policy: str = "lru"
    prefetch_depth: int = 2  # MoE layers ahead
    # guesses loaded for the next layer, speculative loads in flight: default top_k + 1 and
    # 2 top_k + 1 where that many experts fit in one io_chunk, else top_k (scheduler.speculation)
    prefetch_width: int | None = None
    max_speculative_loads: int | None = None
    budget_split: str = "pooled"
    predictor_dir: str | None = None  # where a trained routing predictor lives (default: the model dir)
    dtype: torch.dtype | None = None  # compute dtype; None = the checkpoint's
    direct_io: Literal["auto", "require", "never"] = "auto"
    io_workers: int = 4
    io_chunk: int = 4 << 20  # largest part of one read: a demand read waits for at most one part
    store_dir: str | None = None
    store_mode: str = "auto"
    prefill_chunk: int = 512  # tokens per forward pass (and per step): bounds a long prompt's attention memory
    max_batch_sequences: int = 64  # sequences one step runs together (continuous batching)
    # when more sequences wait than a step takes: 'fifo' (arrival order) or 'regroup' (by routing
    # path, scheduling/regroup.py, with resident-only sequences sent ahead while the others'
    # misses load; 0.79-1.10x fifo on the CPU and simulated-GPU benches, see README);
    # a regrouped sequence waits at most regroup_max_wait steps
    batch_order: str = "fifo"
    regroup_max_wait: int = 4
    kv_budget: int | None = None  # bytes of KV cache for all admitted requests; None: no bound (auto: see below)
    # expert_budget='auto': bytes kept free for the KV cache and activations (None: 10% of the free
    # memory, at least 1 GiB); the KV cache gets 3/4 of it as kv_budget unless kv_budget is set
    memory_reserve: int | None = None
    verify_checksums: bool = True
    progress: bool = False
    threads: int | None = None
    precision: str | None = None  # expert store precision: None = the compute dtype; 'int8', 'int4-g64', ...
    group_size: int | None = None  # quantization group size (default per precision)
    miss_precision: str | None = None  # HOBBIT: a low-precision copy for unimportant misses (off: exact)
    miss_thresholds: tuple[float, float] = (0.6, 0.9)  # (T1, T2) on the cumulative gate weight
    low_precision_share: float = 0.25  # share of expert_budget given to the low-precision cache
    # device="sim" (a test device): its copy engine's bandwidth and per-copy latency
    sim_bandwidth_gbps: float = 25.0
    sim_latency_us: float = 10.0
    # GPU / sim: where a missing expert runs (scheduling/placement.py): "copy" (wait for its copy),
    # "cpu" (compute it on the CPU from its pinned host home), "auto" (the cost model decides)
    miss_compute: str = "copy"
    # GPU / sim: MoE layers whose experts always run on the CPU, never copied (llama.cpp's
    # --n-cpu-moe): the first N MoE layers, or a tuple of layer indices ("0-3,7" as given)
    cpu_layers: int | tuple[int, ...] = 0

    @classmethod
    def from_user(cls, **kw: Any) -> EngineConfig:
        """Validate user options. Unknown names raise TypeError; bad values raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        out: dict[str, Any] = {}
        if "expert_budget" in kw:
            out["expert_budget"] = parse_budget(kw["expert_budget"])
        if kw.get("host_budget") is not None:
            out["host_budget"] = parse_budget(kw["host_budget"], "host_budget", allow_auto=False)
        for name, allowed in (
            ("device", DEVICES),
            ("prefetch", PREFETCHERS),
            ("policy", POLICIES),
            ("direct_io", DIRECT_IO),
            ("store_mode", STORE_MODES),
            ("budget_split", BUDGET_SPLITS),
            ("batch_order", BATCH_ORDERS),
            ("miss_compute", MISS_COMPUTE),
        ):
            if name in kw:
                out[name] = _choice(name, kw[name], allowed)
        if kw.get("dtype") is not None:
            dtype = kw["dtype"]
            if isinstance(dtype, str):
                dtype = compute_dtypes().get(dtype.replace("torch.", ""))
            if dtype not in compute_dtypes().values():
                raise ConfigError(f"dtype={kw['dtype']!r}: expected one of {', '.join(DTYPE_NAMES)}")
            out["dtype"] = dtype
        if out.get("prefetch") == "predictor":
            out["prefetch"] = "auto"
        if "io_workers" in kw:
            out["io_workers"] = _positive_int("io_workers", kw["io_workers"], MAX_IO_WORKERS, "read threads")
        if kw.get("kv_budget") is not None:
            out["kv_budget"] = parse_size(kw["kv_budget"], "kv_budget")
            if out["kv_budget"] == 0:
                raise ConfigError(f"kv_budget={kw['kv_budget']!r}: expected a positive size, or None for no bound")
        if kw.get("memory_reserve") is not None:
            out["memory_reserve"] = parse_size(kw["memory_reserve"], "memory_reserve")
            if not out.get("expert_budget", Budget()).auto:
                raise ConfigError(f"memory_reserve={kw['memory_reserve']!r} applies only to expert_budget='auto'; "
                                  "with a fixed expert_budget, drop it (or set expert_budget='auto')")
        for name in ("prefetch_depth", "prefill_chunk", "max_batch_sequences", "regroup_max_wait"):
            if name in kw:
                out[name] = _positive_int(name, kw[name])
        for name in ("prefetch_width", "max_speculative_loads"):
            if kw.get(name) is not None:
                out[name] = _positive_int(name, kw[name])
        if "io_chunk" in kw:
            chunk = parse_size(kw["io_chunk"], "io_chunk")
            if chunk < 4096 or chunk % 4096 or chunk > MAX_IO_CHUNK:
                raise ConfigError(f"io_chunk={kw['io_chunk']!r}: expected a positive multiple of 4 KiB, at most 1 TiB")
            out["io_chunk"] = chunk
        if kw.get("threads") is not None:
            # more compute threads than CPUs only slows torch down (and a huge count crashes it)
            cpus = _cpu_count()
            out["threads"] = _positive_int("threads", kw["threads"], cpus, f"this machine has {cpus} CPUs")
        for name in ("store_dir", "predictor_dir"):
            if kw.get(name) is not None:
                try:
                    out[name] = os.fspath(kw[name])
                except TypeError:
                    raise ConfigError(f"{name}={kw[name]!r}: expected a folder path (str or os.PathLike)") from None
        if kw.get("group_size") is not None:
            out["group_size"] = _positive_int("group_size", kw["group_size"])
        for name in ("precision", "miss_precision"):
            if kw.get(name) is not None:
                from moeflow.store.codecs import codec_for

                try:
                    codec_for(str(kw[name]), out.get("group_size"))
                except ConfigError as e:  # the codec names the value; say which options hold it
                    group = f" with group_size={out['group_size']}" if "group_size" in out else ""
                    raise ConfigError(f"{name}={kw[name]!r}{group}: {e}") from e
                out[name] = str(kw[name])
        if "miss_thresholds" in kw:
            t = kw["miss_thresholds"]
            if (
                not isinstance(t, (tuple, list))
                or len(t) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t)
                or not 0 <= t[0] <= t[1] <= 1
            ):
                raise ConfigError(f"miss_thresholds={t!r}: expected (T1, T2) with 0 <= T1 <= T2 <= 1")
            out["miss_thresholds"] = (float(t[0]), float(t[1]))
        if "low_precision_share" in kw:
            share = kw["low_precision_share"]
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
                raise ConfigError(f"low_precision_share={share!r}: expected a fraction in (0, 1)")
            out["low_precision_share"] = float(share)
        for name, low in (("sim_bandwidth_gbps", 1e-6), ("sim_latency_us", 0.0)):
            if name in kw:
                v = kw[name]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < 1e9 or v != v:
                    raise ConfigError(f"{name}={v!r}: expected a finite number >= {low:g}")
                out[name] = float(v)
        if kw.get("cpu_layers") is not None:
            try:
                out["cpu_layers"] = parse_cpu_layers(kw["cpu_layers"])
            except ValueError as e:
                raise ConfigError(f"cpu_layers={kw['cpu_layers']!r}: {e}") from None
        if out.get("device") == "cpu":
            for name, unset in (("miss_compute", "copy"), ("cpu_layers", 0)):
                if out.get(name, unset) != unset:
                    raise ConfigError(
                        f"{name}={kw[name]!r} with device='cpu': experts already run on the CPU (there is no "
                        f"second tier to compute in); drop {name}, or use device='cuda' (or 'sim')")
        for name in ("verify_checksums", "progress"):
            if name in kw:
                if not isinstance(kw[name], bool):
                    raise ConfigError(f"{name}={kw[name]!r}: expected True or False")
                out[name] = kw[name]
        return cls(**out)


@dataclass(frozen=True)
class MemoryPlan:
    """Sizes derived once from the config and the model: the fast tier's shape."""

    block_bytes: int  # one expert in the store's precision, 4 KiB-aligned
    experts_total: int  # routed experts over all MoE layers
    top_k: int
    budget_bytes: int  # as asked, resolved against the model
    slots: int  # experts that fit in the fast tier

    @property
    def total_expert_bytes(self) -> int:
        return self.block_bytes * self.experts_total

    @property
    def min_budget_bytes(self) -> int:
        return self.block_bytes * self.top_k

    @property
    def arena_bytes(self) -> int:
        return self.slots * self.block_bytes

    @classmethod
    def build(cls, budget: Budget, block_bytes: int, experts_total: int, top_k: int,
              option: str = "expert_budget") -> MemoryPlan:
        """Refuses (ConfigError naming `option`) a budget below the top-k experts of one layer,
        naming the minimum."""
        asked = budget.resolve(block_bytes * experts_total)
        minimum = block_bytes * top_k
        if asked < minimum:
            raise ConfigError(
                f"{option}={budget} ({asked} bytes) is below the minimum of {minimum} bytes "
                f"({format_bytes(minimum)}: the top-{top_k} experts of one layer, {format_bytes(block_bytes)} each)"
            )
        slots = min(asked // block_bytes, experts_total)
        return cls(block_bytes, experts_total, top_k, asked, slots)

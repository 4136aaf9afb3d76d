"""Physics checks for benchmark figures: bytes moved per second may not beat the link's measured peak.

A benchmark measures its link's peak in the same run (`link_peak`), then passes every figure that
implies a transfer rate through `check_rate` (raises PhysicsViolation) or `refusal` (returns the
reason, for a JSON line that must still be printed). A figure that beats the peak means the engine
did not move the bytes it claims (the GPU path once copied 4 MiB of each expert and decoded at
"150 GB/s" over a 55 GB/s link) or the timer stopped before the work ended; either way it is not
printed as a result.

    peak = physics.link_peak("cuda")                       # pinned host -> device, bytes/s
    physics.check_rate("decode h2d", bytes_loaded, decode_seconds, peak)

Used by bench_gpu.py (device 'cuda') and bench_decode.py (device 'sim': the simulated copy
engine's configured bandwidth is its peak, `link_peak("sim", sim_bandwidth=sim_bandwidth_gbps * 1e9)`
with the engine's option; 'cpu': pass the disk's measured bandwidth yourself).
"""

from __future__ import annotations

import time

TOLERANCE = 0.05  # timer granularity and clock drift; a real violation is far larger
PEAK_BYTES = 256 << 20


class PhysicsViolation(ValueError):
    """A figure moved bytes faster than the link allows."""

    def __init__(self, name: str, bytes_moved: float, seconds: float, peak: float) -> None:
        self.name, self.bytes_moved, self.seconds, self.peak = name, bytes_moved, seconds, peak
        rate = bytes_moved / seconds if seconds > 0 else float("inf")
        super().__init__(
            f"{name}: {bytes_moved / 1e9:.3f} GB in {seconds:.4f} s is {rate / 1e9:.2f} GB/s, above the link's "
            f"measured peak of {peak / 1e9:.2f} GB/s (+{TOLERANCE:.0%}): the figure is refused"
        )


def check_rate(name: str, bytes_moved: float, seconds: float, peak: float, tolerance: float = TOLERANCE) -> float:
    """The achieved bytes/s of a figure; raises PhysicsViolation when it beats `peak` (bytes/s) by
    more than `tolerance`, or when bytes moved in no time at all."""
    if peak <= 0:
        raise ValueError(f"peak={peak!r}: a link peak is a positive number of bytes per second")
    if bytes_moved < 0 or seconds < 0:
        raise ValueError(f"{name}: bytes_moved={bytes_moved!r} and seconds={seconds!r} cannot be negative")
    if bytes_moved == 0:
        return 0.0
    if seconds == 0 or bytes_moved / seconds > peak * (1 + tolerance):
        raise PhysicsViolation(name, bytes_moved, seconds, peak)
    return bytes_moved / seconds


def refusal(name: str, bytes_moved: float, seconds: float, peak: float, tolerance: float = TOLERANCE) -> str | None:
    """None when the figure is physical, else the reason it is refused (for a JSON field)."""
    try:
        check_rate(name, bytes_moved, seconds, peak, tolerance)
    except PhysicsViolation as e:
        return str(e)
    return None


def pinned_h2d_peak(size: int = PEAK_BYTES, runs: int = 3) -> float:
    """Pinned host -> device bytes/s of one `size` copy, best of `runs`, timed by wall clock up to
    torch.cuda.synchronize() (a timer that stops before the copy ends measures nothing)."""
    import torch

    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up: first-touch and mapping costs are not the link's
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return size / best


def link_peak(device: str, *, sim_bandwidth: float | None = None) -> float:
    """The slow tier -> fast tier peak in bytes/s: measured for 'cuda', configured for 'sim'
    (`sim_bandwidth`, the simulated copy engine's bytes/s). A CPU-only engine's link is its disk:
    measure it where the store lives (bench_decode's dd_bandwidth) and pass that to check_rate."""
    if device == "cuda":
        return pinned_h2d_peak()
    if device == "sim":
        if sim_bandwidth is None or sim_bandwidth <= 0:
            raise ValueError(f"sim_bandwidth={sim_bandwidth!r}: the simulated device's peak is its configured "
                             "bandwidth in bytes/s")
        return float(sim_bandwidth)
    raise ValueError(f"device={device!r}: link_peak knows 'cuda' (measured) and 'sim' (configured); "
                     "for 'cpu' measure the disk holding the store")

"""The compute device seen by the memory layer: how compute waits for a copy, fences a block's
reuse, reports its reads, and reads results back to the host (the one counted sync point).

Three kinds run the same orchestration:
- "cpu": torch on the CPU over host RAM; compute is synchronous, nothing to order.
- "cuda": torch on a GPU; compute is asynchronous on torch's current stream, copies run on the
  transfer engine's copy stream and are ordered with CUDA events both ways.
- "sim": the simulated GPU of the Rust core (a test device): device memory in host RAM behind a
  copy engine with set bandwidth and latency, CUDA-like events, and a hazard checker that fails
  a read before its copy landed, a copy over a block compute still reads, and a read of
  never-written bytes. Compute is torch on the CPU, so a stream wait blocks the caller.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moeflow import _core


class ComputeDevice:
    """Base: the CPU. Subclasses order compute against copies."""

    kind = "cpu"
    #: copies into a reused block must wait for the compute that read it before
    needs_fences = False

    def __init__(self) -> None:
        self.torch_device = torch.device("cpu")
        self.host_syncs = 0
        self.stall_seconds = 0.0  # time compute waited for copies, settled by `collect`

    # ---- ordering --------------------------------------------------------------------------
    def wait(self, event: _core.CudaEvent) -> None:
        """Compute issued from now on runs after `event` (a copy's completion)."""

    def fence(self) -> _core.CudaEvent | None:
        """An event after every compute issued so far (None where compute is synchronous)."""
        return None

    def before_read(self, address: int, length: int) -> None:
        """Compute is about to read `length` bytes of device memory at `address`."""

    # ---- the host's view -------------------------------------------------------------------
    def readback(self, *tensors: torch.Tensor | None) -> list[Any]:
        """Host lists of `tensors` in one blocking read (the only place the engine waits for
        device results, so `host_syncs` counts every such wait)."""
        self.host_syncs += 1
        return [None if t is None else t.tolist() for t in tensors]

    def host_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as an ordinary CPU tensor (one blocking read, counted)."""
        self.host_syncs += 1
        out = t.to("cpu")
        return out.clone() if out is t else out  # never hand out the step's own (inference) tensor

    def collect(self) -> float:
        """Stall seconds measured since the last call (after the step's readback)."""
        stall, self.stall_seconds = self.stall_seconds, 0.0
        return stall

    def close(self) -> None:
        """Release device-side resources (events, handles)."""


class CudaDevice(ComputeDevice):
    """torch's current CUDA stream; stalls are timed on the GPU with event pairs around each wait."""

    kind = "cuda"
    needs_fences = True

    def __init__(self, index: int = 0) -> None:
        super().__init__()
        self.torch_device = torch.device("cuda", index)
        self.index = index
        self._timers: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wait(self, event: _core.CudaEvent) -> None:
        stream = torch.cuda.current_stream(self.torch_device)
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(stream)
        event.wait_on(stream.cuda_stream)
        after.record(stream)
        self._timers.append((before, after))

    def fence(self) -> _core.CudaEvent:
        return _core.record_cuda_event(torch.cuda.current_stream(self.torch_device).cuda_stream, self.index)

    def readback(self, *tensors: torch.Tensor | None) -> list[Any]:
        self.host_syncs += 1
        staged = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
        torch.cuda.current_stream(self.torch_device).synchronize()
        return [t.tolist() if t is not None else None for t in staged]

    def collect(self) -> float:
        # Called after the step's readback: every timer pair has completed by then.
        for before, after in self._timers:
            self.stall_seconds += before.elapsed_time(after) * 1e-3
        self._timers.clear()
        return super().collect()


class SimDevice(ComputeDevice):
    """The simulated GPU (`device="sim"`): see the module docs."""

    kind = "sim"
    needs_fences = True

    def __init__(self, bandwidth_gbps: float, latency_us: float, check_hazards: bool = True) -> None:
        super().__init__()
        self.sim = _core.SimDevice(bandwidth_gbps=bandwidth_gbps, latency_us=latency_us,
                                   check_hazards=check_hazards)

    def wait(self, event: _core.CudaEvent) -> None:
        if event.query():
            self.sim.wait(event)  # records the ordering; returns at once
            return
        started = time.perf_counter()
        self.sim.wait(event)  # compute is the caller's thread: it waits here
        self.stall_seconds += time.perf_counter() - started

    def fence(self) -> _core.CudaEvent:
        return self.sim.record_compute()

    def before_read(self, address: int, length: int) -> None:
        self.sim.compute_read(address, length)

    def readback(self, *tensors: torch.Tensor | None) -> list[Any]:
        out = super().readback(*tensors)
        self.sim.synchronize()  # the host saw the results: every read so far has retired
        return out


def make_device(kind: str, *, sim_bandwidth_gbps: float = 25.0, sim_latency_us: float = 10.0) -> ComputeDevice:
    if kind == "cuda":
        return CudaDevice(0)
    if kind == "sim":
        return SimDevice(sim_bandwidth_gbps, sim_latency_us)
    return ComputeDevice()

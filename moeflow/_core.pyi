"""Type stub of moeflow._core, the Rust memory core (slab arenas, transfer queues).

Users import `moeflow`, never `_core`; the Python layer in moeflow/memory wraps it.
Every call is synchronous and never blocks on I/O: transfers run on Rust worker
threads and report through a completion queue signalled by an eventfd.
"""

import sys
from typing import Final, Literal, final

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__version__: Final[str]

PAGE_SIZE: Final[int]
"""The machine's page size in bytes."""
DIRECT_IO_ALIGN: Final[int]
"""Alignment (bytes) of offset, length and address that O_DIRECT reads need (4096)."""

# Priorities: lower value runs first.
PRIORITY_DEMAND: Final[int]  # 0: a layer is waiting for it
PRIORITY_PREFETCH: Final[int]  # 1: predicted for a coming layer
PRIORITY_BACKGROUND: Final[int]  # 2: speculative, far ahead
SPECULATIVE_PART: Final[int]
"""Largest part of a prefetch/background device copy (8 MiB): a demand copy waits on
the copy stream behind at most one such part."""

def cuda_available() -> bool:
    """True when libcuda loads, cuInit succeeds and at least one device exists."""

def cuda_device_count() -> int: ...
def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 (IEEE) of `data`, continuing from `value`; releases the GIL."""

def record_cuda_event(stream: int, device: int = 0) -> CudaEvent:
    """Record an event on `stream` (a CUstream pointer, e.g.
    torch.cuda.current_stream().cuda_stream) in the primary context of `device`. A copy
    given it as `after` waits for the work queued on that stream before it (the engine
    records one when it releases an expert, so the copy reusing the block waits for the
    kernels reading it). Raises CudaUnavailable without CUDA."""

def bf16_linear(x: int, m: int, k: int, w: int, n: int, y: int, x_bf16: bool, y_bf16: bool, bias: int = 0,
                threads: int = 1) -> None:
    """y = x w^T (+ bias) on the CPU, by address: x [m, k] bfloat16 if x_bf16 else float32,
    w [n, k] bfloat16, bias [n] float32 (0: none), y [m, n] bfloat16 if y_bf16 else float32,
    all C-contiguous. For CPUs without bf16 instructions (AVX2 + FMA); each output's arithmetic
    is fixed, whatever the rows. moeflow/runtime/cpu_bf16.py checks the tensors; raises
    ValueError on a refusal."""

def mxfp4_linear(x: int, m: int, k: int, blocks: int, scales: int, n: int, y: int, x_bf16: bool, y_bf16: bool,
                 bias: int = 0, threads: int = 1) -> None:
    """bf16_linear with MXFP4 weights by address: blocks [n, k/32, 16] and scales [n, k/32] uint8
    (store/mxfp4.py's layout), k a multiple of 32; the bits of bf16_linear over the dequantized
    matrix."""

def minmax_linear(x: int, m: int, k: int, q: int, scale: int, zero: int, bits: int, group: int, bf16_weights: bool,
                  n: int, y: int, x_bf16: bool, y_bf16: bool, bias: int = 0, threads: int = 1) -> None:
    """bf16_linear with group-wise min-max weights by address (store/quant.py's layout): codes
    [n, k * bits / 8] uint8, scale and zero [n, k / group] float16; w = (q - zero) * scale in
    float32, rounded to bf16 first when bf16_weights. bits 2, 4 or 8; the group a multiple of 8
    dividing k."""

def bf16_linear_available() -> bool:
    """Whether this CPU runs bf16_linear, mxfp4_linear and minmax_linear (x86-64 with AVX2, FMA
    and F16C)."""

def rms_norm(x: int, rows: int, dim: int, w: int, y: int, eps: float, x_bf16: bool, w_bf16: bool, lanes: int = 8,
             threads: int = 1) -> None:
    """RMSNorm on the CPU, by address: x [rows, dim] bfloat16 if x_bf16 else float32, w [dim]
    bfloat16 if w_bf16 else float32, y [rows, dim] bfloat16 when both are, else float32, all
    C-contiguous; the bits of torch's `w * F.rms_norm(x.float(), (dim,), None, eps).to(x.dtype)`
    where torch sums floats in vectors of `lanes` (8 or 16). moeflow/runtime/cpu_ops.py checks
    the tensors; raises ValueError on a refusal."""

def rope_half(x: int, cos: int, sin: int, n: int, dim: int, y: int, bf16: bool) -> None:
    """Rotary embedding with half-split pairs, by address: x, cos, sin and y hold n values (rows
    of dim, dim even), all bfloat16 if bf16 else float32, C-contiguous; the bits of torch's
    `x * cos + x.roll(dim // 2, -1) * sin`. moeflow/runtime/cpu_ops.py checks the tensors; raises
    ValueError on a refusal."""

# Exceptions (created in Rust, re-exported by moeflow.errors)
class MoeflowError(Exception): ...

class OutOfBudget(MoeflowError):
    requested: int
    available: int

class InvalidHandle(MoeflowError): ...
class StaleHandle(InvalidHandle): ...
class ForeignHandle(InvalidHandle): ...
class BlockPinned(MoeflowError): ...

class ArenaError(MoeflowError):
    requested: int

class AlignmentError(MoeflowError): ...

class TransferError(MoeflowError):
    op: str
    path: str | None
    errno: int | None
    offset: int | None
    length: int | None

class ShortRead(TransferError):
    got: int

class ChecksumMismatch(TransferError):
    expected: int
    actual: int

class CudaError(MoeflowError):
    code: int

class CudaUnavailable(CudaError): ...
class EngineClosed(MoeflowError): ...

class HazardError(MoeflowError):
    """The simulated device's hazard checker saw an ordering bug."""

    kind: Literal["read-before-copy", "copy-over-read", "poison"]
    address: int
    length: int

@final
class ArenaBuffer:
    """A buffer-protocol view of part of an arena in host memory (a host arena or a
    simulated device's); keeps the arena alive."""

    @property
    def address(self) -> int: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

@final
class HostArena:
    """One page-aligned anonymous mapping; mlock attempted, CUDA page-locked when a GPU exists."""

    def __new__(cls, size: int, *, lock: bool = True, cuda_register: bool = True) -> HostArena:
        """`size` is rounded up to PAGE_SIZE. Raises ArenaError (zero size, or the
        machine cannot map it: the message names the size and the OS error)."""

    @property
    def size(self) -> int: ...
    @property
    def address(self) -> int: ...
    @property
    def locked(self) -> bool:
        """mlock succeeded."""

    @property
    def lock_error(self) -> str | None:
        """Why mlock failed (e.g. 'ENOMEM: RLIMIT_MEMLOCK'), or None."""

    @property
    def cuda_registered(self) -> bool:
        """Page-locked through cuMemHostRegister."""

    def view(self, offset: int, length: int) -> ArenaBuffer:
        """Writable buffer over [offset, offset+length). Raises ValueError out of range."""

@final
class DeviceArena:
    """One device allocation (cuMemAlloc) in the primary context of `device`; with
    `sim`, simulated device memory: a page-aligned host mapping filled with 0xFF
    (NaN in bf16/fp32) until copies write it, which `SlabAllocator.view` can view."""

    def __new__(cls, size: int, *, device: int = 0, sim: SimDevice | None = None) -> DeviceArena:
        """Raises CudaUnavailable without CUDA (and without `sim`), ArenaError on zero
        size, CudaError otherwise."""

    @property
    def size(self) -> int: ...
    @property
    def address(self) -> int:
        """Device pointer (CUdeviceptr) of the start; a host pointer when simulated."""

    @property
    def device(self) -> int: ...
    @property
    def sim(self) -> SimDevice | None:
        """The simulated device the arena belongs to, or None on a real one."""

@final
class SimDevice:
    """A simulated GPU for tests: its DeviceArenas live in host memory, one copy-engine
    thread models one FIFO copy stream (each part takes latency + bytes / bandwidth of
    wall time, and its bytes land only then), events and stream waits behave like
    CUDA's, and a hazard checker raises HazardError on ordering bugs.

    Compute is torch on the CPU: report each read with `compute_read` before it.
    Compute is ordered after a copy by `wait(event)`, the event's `synchronize()` (or a
    `query()` that returned True), or popping the copy's 'done' completion; a copy is
    ordered after compute by `after=record_compute()` (its copy stream waits on it),
    or by `synchronize()` (the host waited for compute)."""

    def __new__(
        cls, *, bandwidth_gbps: float = 25.0, latency_us: float = 10.0, check_hazards: bool = True
    ) -> SimDevice:
        """bandwidth in GB/s (1e9 bytes/s), latency per copy part; ValueError naming a
        bad value."""

    @property
    def bandwidth_gbps(self) -> float: ...
    @property
    def latency_us(self) -> float: ...
    @property
    def check_hazards(self) -> bool: ...
    @property
    def hazards(self) -> int:
        """Hazards seen so far (raised by compute_read or failing a copy)."""

    @property
    def last_hazard(self) -> str | None: ...
    @property
    def bytes_copied(self) -> int:
        """Bytes that landed (copies into, out of and within simulated memory)."""

    @property
    def busy_seconds(self) -> float:
        """Time the copy engine was busy, latency included."""

    def compute_read(self, address: int, length: int) -> None:
        """Compute is about to read [address, address+length) of a simulated arena.
        Raises HazardError: 'poison' when a byte was never written since the arena was
        made or its block freed; 'read-before-copy' when the copy writing a byte has not
        landed, or compute is not ordered after it. ValueError outside every arena."""

    def record_compute(self) -> CudaEvent:
        """An event after all compute so far (complete at once); a copy given it as
        `after` is ordered after every read reported before."""

    def wait(self, event: CudaEvent) -> None:
        """The compute stream waits on `event`: blocks until it completed (GIL
        released) and orders later compute after it. ValueError for another device's
        event, TypeError for a CUDA event."""

    def synchronize(self) -> None:
        """The host synchronised the compute stream: every read so far is retired."""

@final
class BlockHandle:
    """A live block of a SlabAllocator: immutable, hashable, compares by identity fields.

    The generation makes a handle to a freed (and maybe reused) block stale
    (StaleHandle); the allocator id makes a handle of another allocator
    foreign (ForeignHandle)."""

    @property
    def allocator_id(self) -> int: ...
    @property
    def size_class(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def offset(self) -> int:
        """Byte offset of the block in its arena."""

    @property
    def size(self) -> int:
        """Block size in bytes (the class's, aligned)."""

    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class SlabAllocator:
    """Slab allocator over an arena: size classes of fixed-size blocks, O(1) alloc and free.

    The arena is cut into slabs of `slab_size` bytes; a slab serves one size class
    while it holds live blocks and returns to the shared pool when all its blocks
    are free. `budget` caps the bytes of live blocks (<= arena size).
    """

    def __new__(
        cls,
        arena: HostArena | DeviceArena,
        budget: int,
        *,
        slab_size: int | None = None,
        align: int = 4096,
    ) -> SlabAllocator:
        """slab_size defaults to min(arena size, 64 MiB) rounded down to `align`;
        raises ValueError on zero/oversized budget or bad alignment (names the value)."""

    @property
    def id(self) -> int: ...
    @property
    def budget(self) -> int: ...
    @property
    def slab_size(self) -> int: ...
    @property
    def arena_kind(self) -> Literal["host", "device"]: ...
    def add_class(self, block_size: int) -> int:
        """Register a size class; returns its id. block_size is rounded up to `align`
        and must not exceed slab_size (ValueError naming both)."""

    def block_size(self, size_class: int) -> int: ...
    def alloc(self, size_class: int) -> BlockHandle:
        """Raises OutOfBudget (requested, available) when the budget or the arena is exhausted."""

    def try_alloc(self, size_class: int) -> BlockHandle | None: ...

    def pin(self, handle: BlockHandle) -> int:
        """Increment the pin count (returns the new count). A pinned block cannot be freed."""

    def unpin(self, handle: BlockHandle) -> int:
        """Decrement; ValueError when the count is already zero."""

    def pin_count(self, handle: BlockHandle) -> int: ...
    def is_live(self, handle: BlockHandle) -> bool:
        """True when `handle` belongs to this allocator and is the current generation."""

    def address(self, handle: BlockHandle) -> int:
        """Absolute address (host pointer or device pointer)."""

    def view(self, handle: BlockHandle) -> ArenaBuffer:
        """Writable buffer over the whole block (host and simulated device arenas;
        TypeError on a real device)."""

    def free(self, handle: BlockHandle) -> None:
        """Raises StaleHandle (already freed: double free), ForeignHandle, BlockPinned.
        On a simulated device the block's bytes become poison for the hazard checker."""

    @property
    def used(self) -> int: ...
    @property
    def live_blocks(self) -> int: ...
    @property
    def pinned_blocks(self) -> int: ...
    def stats(self) -> dict[str, object]:
        """budget, used, available, high_water, live_blocks, pinned_blocks, slab_size,
        slabs_total, slabs_free, allocs, frees, and `classes`: a list of dicts
        (block_size, blocks_per_slab, live, high_water, slabs)."""

@final
class Completion:
    """What a finished (or cancelled) transfer reports."""

    @property
    def id(self) -> int: ...
    @property
    def status(self) -> Literal["done", "failed", "cancelled", "issued"]:
        """'issued' is posted for device copies when the copy is queued on the
        copy stream (event set), before 'done'."""

    @property
    def bytes(self) -> int: ...
    @property
    def nanos(self) -> int:
        """Nanoseconds from the first part starting to the last finishing (0 if never started)."""

    @property
    def queued_nanos(self) -> int:
        """Nanoseconds from submission to the first part starting."""

    @property
    def direct(self) -> bool:
        """Some part used O_DIRECT."""

    @property
    def tag(self) -> int:
        """The caller's tag given at submission."""

    @property
    def event(self) -> CudaEvent | None: ...
    def error(self) -> MoeflowError | None:
        """The typed exception for a failed transfer (not raised)."""

@final
class CudaEvent:
    """An event: recorded after a device copy's last part, on a caller's stream
    (`record_cuda_event`), or by a simulated device (`simulated` is True)."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...
    def wait_on(self, stream: int) -> None:
        """cuStreamWaitEvent(stream, event): make `stream` (a CUstream pointer, e.g.
        torch.cuda.current_stream().cuda_stream) wait for this event. A simulated event
        ignores `stream` and does `SimDevice.wait(event)`."""

    @property
    def simulated(self) -> bool: ...

@final
class TransferEngine:
    """Worker threads fed by lock-free priority lanes; completions on a lock-free
    queue, signalled on `eventfd`. Destination (and source) blocks are pinned
    from submission until the transfer ends; with owned=True a failed or cancelled
    transfer also frees its destination block."""

    def __new__(
        cls,
        *,
        workers: int = 4,
        chunk_size: int = 8 << 20,
        device: int | None = None,
        sim: SimDevice | None = None,
    ) -> TransferEngine:
        """`device` (a CUDA ordinal) or `sim` (a simulated device) fixes the device the
        engine copies for and starts its copy stream now; without either, the first
        device copy decides. ValueError when both are given.

        Device copies move every byte: they are cut into parts of at most chunk_size
        (prefetch and background copies: at most min(chunk_size, SPECULATIVE_PART)) on
        one FIFO copy stream. Demand parts are issued at once; at most one speculative
        part is in flight, and none is issued while demand parts wait."""
    @property
    def eventfd(self) -> int:
        """Readable when completions are waiting (an eventfd; read 8 bytes to reset)."""

    @property
    def workers(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    def register_file(self, path: str) -> int:
        """Open `path` (buffered and, where the filesystem allows, O_DIRECT);
        returns a file id. Raises TransferError naming path and errno."""

    def unregister_file(self, file_id: int) -> None: ...
    def file_size(self, file_id: int) -> int: ...
    def submit_read(
        self,
        file_id: int,
        file_offset: int,
        length: int,
        dst: SlabAllocator,
        dst_handle: BlockHandle,
        *,
        dst_offset: int = 0,
        priority: int = 1,
        direct: Literal["auto", "require", "never"] = "auto",
        expect_crc32: int | None = None,
        owned: bool = True,
        tag: int = 0,
    ) -> int:
        """file -> host block. Validates ranges at submission: ValueError when the
        range exceeds the block, ShortRead-style TransferError is reported through the
        completion when the file is shorter. direct='require' with an unaligned
        offset/length/address raises AlignmentError at submission. Returns the id."""

    def submit_copy(
        self,
        src: SlabAllocator,
        src_handle: BlockHandle,
        dst: SlabAllocator,
        dst_handle: BlockHandle,
        length: int,
        *,
        src_offset: int = 0,
        dst_offset: int = 0,
        priority: int = 1,
        owned: bool = True,
        tag: int = 0,
        after: CudaEvent | None = None,
    ) -> int:
        """host->host, host->device, device->host, device->device. A device copy posts
        'issued' (with the event recorded after its last part) once every part is queued
        on the copy stream, then 'done' once that event completed; `bytes` is `length`.
        The copy waits for `after` before writing any byte (the copy stream waits on
        it; a host copy's worker waits for it): TypeError/ValueError when `after`
        belongs to another kind of device or another simulated device."""

    def cancel(self, transfer_id: int) -> bool:
        """True when no part had started: the transfer will never run, its pins are
        released now (its block freed if owned) and a 'cancelled' completion is
        posted. False when it already started or finished: it runs to completion.
        A device copy can be cancelled while some part is not issued: the unissued
        parts are dropped and it ends 'cancelled' once the issued parts landed
        (`bytes` says how many), an owned destination freed then."""

    def promote(self, transfer_id: int, priority: int) -> bool:
        """Move a queued transfer's unstarted (device copies: unissued) parts to a more
        urgent lane."""

    def try_pop(self) -> Completion | None: ...
    def drain(self) -> list[Completion]:
        """All completions waiting now, and reset the eventfd."""

    def wait(self, timeout: float | None = None) -> Completion | None:
        """Blocking pop (GIL released) for scripts and tests; asyncio code uses eventfd."""

    def inject_fault(self, file_id: int, errno: int, count: int = 1) -> None:
        """Testing only: the next `count` reads (parts) of `file_id` fail with `errno`."""

    def add_test_fault(
        self,
        kind: str,
        *,
        op: str = "read",
        file_id: int | None = None,
        offset: int | None = None,
        skip: int = 0,
        count: int = 1,
        errno: int = 5,
        delay: float = 0.0,
    ) -> None:
        """Testing only (nothing in moeflow arms one): arm a fault rule on this engine.

        It watches the parts (one pread or memcpy of at most `chunk_size` bytes) the
        workers run, and the parts of device copies as they are issued: reads
        (`op='read'`), copies (`'copy'`) or both (`'any'`);
        `file_id` and `offset` narrow it to reads of that file, and of the part holding
        that byte. After `skip` matching parts, the next `count` (0: every one until
        `clear_test_faults`) get the fault:
        'errno' fails the read with `errno` (EIO by default), 'short_read' ends the
        file inside the part (at `offset`, else halfway: ShortRead), 'corrupt' flips one
        byte after the read (ChecksumMismatch when a CRC is expected), 'delay' makes the
        part wait `delay` seconds, 'panic' panics the worker (or the copy-stream issuer):
        the transfer fails with a TransferError and the thread goes on.
        ValueError for an unknown kind or op, or a read-only fault given op 'copy'."""

    def clear_test_faults(self) -> None:
        """Testing only: remove every fault rule."""

    def test_fault_hits(self) -> int:
        """Testing only: parts an injected fault has hit since the engine started."""

    def pending(self) -> int:
        """Transfers submitted and not yet completed."""

    def stats(self) -> dict[str, int]:
        """submitted, completed, failed, cancelled, bytes, direct_bytes, busy_nanos (the read
        workers' time on their parts plus the copy stream's busy time, from each part's issue or
        the previous part's landing to its own landing), queued (per lane: queued_demand,
        queued_prefetch, queued_background)."""

    def close(self) -> None:
        """Cancel what is queued, wait for running parts, stop the workers. Idempotent."""

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

def cuda_available() -> bool:
    """True when libcuda loads, cuInit succeeds and at least one device exists."""

def cuda_device_count() -> int: ...
def crc32(data: Buffer, value: int = 0) -> int:
    """CRC-32 (IEEE) of `data`, continuing from `value`; releases the GIL."""

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

@final
class ArenaBuffer:
    """A buffer-protocol view of part of a host arena; keeps the arena alive."""

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
    """One device allocation (cuMemAlloc) in the primary context of `device`."""

    def __new__(cls, size: int, *, device: int = 0) -> DeviceArena:
        """Raises CudaUnavailable without CUDA, ArenaError on zero size, CudaError otherwise."""

    @property
    def size(self) -> int: ...
    @property
    def address(self) -> int:
        """Device pointer (CUdeviceptr) of the start."""

    @property
    def device(self) -> int: ...

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
    def free(self, handle: BlockHandle) -> None:
        """Raises StaleHandle (already freed: double free), ForeignHandle, BlockPinned."""

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
        """Writable buffer over the whole block (host arenas only; TypeError on device)."""

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
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...
    def wait_on(self, stream: int) -> None:
        """cuStreamWaitEvent(stream, event): make `stream` (a CUstream pointer, e.g.
        torch.cuda.current_stream().cuda_stream) wait for this event."""

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
    ) -> TransferEngine: ...
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
    ) -> int:
        """host->host, host->device (copy stream + event), device->host."""

    def cancel(self, transfer_id: int) -> bool:
        """True when no part had started: the transfer will never run, its pins are
        released now (its block freed if owned) and a 'cancelled' completion is
        posted. False when it already started or finished: it runs to completion."""

    def promote(self, transfer_id: int, priority: int) -> bool:
        """Move a queued transfer's unstarted parts to a more urgent lane."""

    def try_pop(self) -> Completion | None: ...
    def drain(self) -> list[Completion]:
        """All completions waiting now, and reset the eventfd."""

    def wait(self, timeout: float | None = None) -> Completion | None:
        """Blocking pop (GIL released) for scripts and tests; asyncio code uses eventfd."""

    def inject_fault(self, file_id: int, errno: int, count: int = 1) -> None:
        """Testing hook: the next `count` reads of `file_id` fail with `errno`."""

    def pending(self) -> int:
        """Transfers submitted and not yet completed."""

    def stats(self) -> dict[str, int]:
        """submitted, completed, failed, cancelled, bytes, direct_bytes, busy_nanos,
        queued (per lane: queued_demand, queued_prefetch, queued_background)."""

    def close(self) -> None:
        """Cancel what is queued, wait for running parts, stop the workers. Idempotent."""

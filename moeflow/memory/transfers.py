"""The asyncio face of the transfer engine: submit transfers, await them without blocking the loop.

The engine's eventfd is registered with the running loop (`loop.add_reader`), so a
completion wakes the loop directly: no polling thread, no busy loop. Each submission
returns a `TransferTicket` (moeflow/memory/ticket.py), awaitable now or later
(prefetches are awaited only when a layer needs them).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from moeflow._core import (
    PRIORITY_DEMAND,
    PRIORITY_PREFETCH,
    BlockHandle,
    Completion,
    CudaEvent,
    SimDevice,
    SlabAllocator,
    TransferEngine,
)
from moeflow.errors import EngineClosed
from moeflow.memory.ticket import DirectMode, TransferTicket

__all__ = ["AsyncTransfers", "DirectMode", "TransferTicket"]


class AsyncTransfers:
    """Async wrapper of a `TransferEngine`, usable as `async with`.

    It owns the engine's completion stream (transfers submitted on the engine
    directly are not reported here); use it from one event loop at a time.
    """

    def __init__(
        self,
        engine: TransferEngine | None = None,
        *,
        workers: int = 4,
        chunk_size: int = 8 << 20,
        device: int | None = None,
        sim: SimDevice | None = None,
    ) -> None:
        if engine is None:
            engine = TransferEngine(workers=workers, chunk_size=chunk_size, device=device, sim=sim)
        self.engine = engine
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tickets: dict[int, TransferTicket] = {}

    def bind_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, watching the eventfd (registered on first use)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("AsyncTransfers is bound to another running event loop")
            # First use, or the previous loop closed: watch the eventfd from this one.
            loop.add_reader(self.engine.eventfd, self._drain)
            self._loop = loop
        return loop

    def register_file(self, path: str) -> int:
        """Open a file for reads; returns its id (TransferError naming path and errno)."""
        return self.engine.register_file(path)

    def unregister_file(self, file_id: int) -> None:
        self.engine.unregister_file(file_id)

    def pending(self) -> int:
        """Transfers submitted here whose completion has not arrived."""
        return len(self._tickets)

    def poll(self) -> None:
        """Resolve the completions that already arrived, without waiting for the loop to
        notice the eventfd (a step about to wait checks first whether it needs to)."""
        if self._tickets and self._loop is not None:
            self._drain()

    def submit_read(
        self,
        file_id: int,
        offset: int,
        length: int,
        allocator: SlabAllocator,
        handle: BlockHandle,
        *,
        dst_offset: int = 0,
        priority: int = PRIORITY_PREFETCH,
        direct: DirectMode = "auto",
        expect_crc32: int | None = None,
        owned: bool = True,
        tag: int = 0,
    ) -> TransferTicket:
        """Queue file -> host block; raises what `TransferEngine.submit_read` raises."""
        self._check_open()
        self.bind_loop()  # before anything can complete
        transfer_id = self.engine.submit_read(
            file_id,
            offset,
            length,
            allocator,
            handle,
            dst_offset=dst_offset,
            priority=priority,
            direct=direct,
            expect_crc32=expect_crc32,
            owned=owned,
            tag=tag,
        )
        return self._track(transfer_id, allocator, handle, owned)

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
        priority: int = PRIORITY_PREFETCH,
        owned: bool = True,
        tag: int = 0,
        after: CudaEvent | None = None,
    ) -> TransferTicket:
        """Queue a block -> block copy (host/device in any direction) that waits for
        `after` (e.g. an event recorded after the compute that last read the
        destination block) before writing any byte."""
        self._check_open()
        self.bind_loop()
        transfer_id = self.engine.submit_copy(
            src,
            src_handle,
            dst,
            dst_handle,
            length,
            src_offset=src_offset,
            dst_offset=dst_offset,
            priority=priority,
            owned=owned,
            tag=tag,
            after=after,
        )
        return self._track(transfer_id, dst, dst_handle, owned)

    async def read(
        self,
        file_id: int,
        offset: int,
        length: int,
        allocator: SlabAllocator,
        handle: BlockHandle,
        *,
        priority: int = PRIORITY_DEMAND,
        direct: DirectMode = "auto",
        expect_crc32: int | None = None,
        owned: bool = True,
    ) -> Completion:
        """Read file bytes into a block and wait (demand priority by default)."""
        ticket = self.submit_read(
            file_id, offset, length, allocator, handle,
            priority=priority, direct=direct, expect_crc32=expect_crc32, owned=owned,
        )
        return await ticket

    async def copy(
        self,
        src: SlabAllocator,
        src_handle: BlockHandle,
        dst: SlabAllocator,
        dst_handle: BlockHandle,
        length: int,
        *,
        priority: int = PRIORITY_DEMAND,
        owned: bool = True,
        after: CudaEvent | None = None,
    ) -> Completion:
        """Copy between blocks and wait (demand priority by default)."""
        return await self.submit_copy(
            src, src_handle, dst, dst_handle, length, priority=priority, owned=owned, after=after
        )

    def cancel(self, ticket: TransferTicket | int) -> bool:
        """Cancel a transfer none of whose parts started; False otherwise."""
        if isinstance(ticket, TransferTicket):
            return ticket.cancel()
        found = self._tickets.get(ticket)
        return found.cancel() if found is not None else self.engine.cancel(ticket)

    def promote(self, ticket: TransferTicket | int, priority: int = PRIORITY_DEMAND) -> bool:
        """Move a queued transfer's unstarted parts to a more urgent lane."""
        transfer_id = ticket.id if isinstance(ticket, TransferTicket) else ticket
        return self.engine.promote(transfer_id, priority)

    def abandon(self, ticket: TransferTicket) -> None:
        """Nobody will receive `ticket`'s result: cancel it, or free its block on arrival."""
        if ticket.done():
            if not ticket._abandoned:
                ticket._release()
            return
        ticket._abandoned = True
        ticket._cancel_requested = True
        # True: the core released the pins and freed an owned block already.
        # False: it is running, and `_resolve` frees the block when it completes.
        self.engine.cancel(ticket.id)

    def close(self) -> None:
        """Cancel queued transfers, wait for running ones, resolve every ticket. Idempotent."""
        self.closing = True
        self.engine.close()
        self._drain()
        self._detach()

    async def aclose(self) -> None:
        """`close()` without blocking the loop while running transfers finish."""
        self.closing = True
        await asyncio.to_thread(self.engine.close)
        self._drain()
        self._detach()

    async def __aenter__(self) -> AsyncTransfers:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self.closing:
            raise EngineClosed("the transfer engine is closed")

    def _track(self, transfer_id: int, dst: SlabAllocator, handle: BlockHandle, owned: bool) -> TransferTicket:
        ticket = TransferTicket(self, transfer_id, dst, handle, owned)
        self._tickets[transfer_id] = ticket
        return ticket

    def _drain(self) -> None:
        """Hand every arrived completion to its ticket. A callback's BaseException (the only
        kind a ticket lets out) waits until the rest are handed over: the engine's queue is
        drained already, so a completion skipped here would leave its waiters forever."""
        escaped: BaseException | None = None
        for completion in self.engine.drain():
            try:
                if completion.status == "issued":
                    # device copies: 'done' follows once the copy stream passed the event
                    issued = self._tickets.get(completion.id)
                    if issued is not None:
                        issued._issued(completion)
                    continue
                ticket = self._tickets.pop(completion.id, None)
                if ticket is not None:
                    ticket._resolve(completion)
            except BaseException as exc:
                escaped = escaped or exc
        if escaped is not None:
            raise escaped

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.engine.eventfd)
        self._loop = None
        # The engine resolves every transfer before close returns; a ticket still here
        # was lost with a closed loop, and its waiters must not hang.
        for ticket in self._tickets.values():
            for future in ticket._waiters:
                if not future.done() and not future.get_loop().is_closed():
                    future.set_exception(EngineClosed(f"transfer {ticket.id}: the engine closed"))
        self._tickets.clear()

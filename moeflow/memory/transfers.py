"""The asyncio face of the transfer engine: submit transfers, await them without blocking the loop.

The engine's eventfd is registered with the running loop (`loop.add_reader`), so a
completion wakes the loop directly: no polling thread, no busy loop. Each submission
returns a `TransferTicket`, awaitable now or later (prefetches are awaited only when
a layer needs them).

Cancellation is normal control flow. When the task consuming a ticket (`await
ticket`) is cancelled, the transfer is cancelled too: if no part had started, the
core releases its pins and frees an owned destination block at once; if it had
started, the block is freed here when its completion arrives. Nothing leaks either
way. A failed transfer raises the typed exception of its `Completion.error()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Literal

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
from moeflow.errors import BlockPinned, EngineClosed, InvalidHandle

__all__ = ["AsyncTransfers", "TransferTicket"]

DirectMode = Literal["auto", "require", "never"]


class TransferTicket:
    """One submitted transfer.

    Two ways to wait: `await ticket` consumes the result (one consumer; cancelling
    the consuming task cancels the transfer), while `await ticket.wait_done()` only
    observes (any number of waiters; never cancels, never raises the transfer's error).
    """

    def __init__(
        self, transfers: AsyncTransfers, transfer_id: int, dst: SlabAllocator, handle: BlockHandle, owned: bool
    ) -> None:
        self.id = transfer_id
        self._transfers = transfers
        self._dst = dst
        self._handle = handle
        self._owned = owned
        self._completion: Completion | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._consumer: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[TransferTicket], object]] = []
        self._issued_callbacks: list[Callable[[TransferTicket], object]] = []
        self._abandoned = False
        self._cancel_requested = False
        self.event: CudaEvent | None = None  # device copies: set when the copy is queued

    def done(self) -> bool:
        """True once the transfer's final completion arrived."""
        return self._completion is not None

    def completion(self) -> Completion:
        """The final completion (asyncio.InvalidStateError while pending)."""
        if self._completion is None:
            raise asyncio.InvalidStateError(f"transfer {self.id} has not finished")
        return self._completion

    def error(self) -> BaseException | None:
        """None when the bytes arrived; else the typed error of a failed transfer,
        EngineClosed when closing the engine cancelled it, CancelledError when `cancel`
        did (asyncio.InvalidStateError while pending)."""
        completion = self.completion()
        if completion.status == "done":
            return None
        error = completion.error()
        if error is not None:
            return error
        if self._transfers.closing and not self._cancel_requested:
            return EngineClosed(f"transfer {self.id} was cancelled because the engine closed")
        return asyncio.CancelledError(f"transfer {self.id} was cancelled")

    def result(self) -> Completion:
        """The completion of a finished transfer, or raise its error (no waiting)."""
        error = self.error()
        if error is not None:
            raise error
        return self.completion()

    def add_done_callback(self, callback: Callable[[TransferTicket], object]) -> None:
        """Call `callback(ticket)` when the transfer finishes (before waiters wake);
        soon, from the loop, if it already has."""
        if self._completion is not None:
            self._transfers.bind_loop().call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def add_issued_callback(self, callback: Callable[[TransferTicket], object]) -> None:
        """Device copies: call `callback(ticket)` once the copy is queued on the copy stream
        (`ticket.event` set: a compute stream may wait on it instead of the CPU waiting)."""
        if self.event is not None:
            self._transfers.bind_loop().call_soon(callback, self)
        else:
            self._issued_callbacks.append(callback)

    def _issued(self, completion: Completion) -> None:
        self.event = completion.event
        callbacks, self._issued_callbacks = self._issued_callbacks, []
        for callback in callbacks:
            callback(self)

    async def wait_done(self) -> None:
        """Wait until the transfer finished, however it ended; cancelling the waiting
        task leaves the transfer alone."""
        if self._completion is None:
            await self._park(consumer=False)

    async def wait(self) -> Completion:
        """Consume the result: the completion, or the transfer's error raised. If this
        task is cancelled meanwhile, the transfer is cancelled, or its owned block is
        freed once it arrives (also when it arrived but was not yet handed over; done
        callbacks may have seen it by then)."""
        if self._completion is None:
            await self._park(consumer=True)
        return self.result()

    async def _park(self, *, consumer: bool) -> None:
        if consumer and self._consumer is not None:
            raise RuntimeError(f"transfer {self.id} is already being awaited")
        future = self._transfers.bind_loop().create_future()
        self._waiters.append(future)
        if consumer:
            self._consumer = future
        try:
            await future
        except BaseException:
            # anyio's pattern: deregister the waiter, leave state consistent, re-raise.
            if future in self._waiters:
                self._waiters.remove(future)
            if consumer:
                self._consumer = None
                self._transfers.abandon(self)
            raise
        if consumer:
            self._consumer = None

    def __await__(self) -> Generator[object, None, Completion]:
        return self.wait().__await__()

    def cancel(self) -> bool:
        """Cancel if no part has started (the core then frees an owned block); else False.
        A device copy is cancellable while some part is unissued: it resolves
        'cancelled' once its issued parts landed."""
        self._cancel_requested = True
        return self._transfers.engine.cancel(self.id)

    def promote(self, priority: int = PRIORITY_DEMAND) -> bool:
        """Move the unstarted (device copies: unissued) parts to a more urgent lane."""
        return self._transfers.engine.promote(self.id, priority)

    def _resolve(self, completion: Completion, loop: asyncio.AbstractEventLoop | None) -> None:
        self._completion = completion
        consumer = self._consumer
        if consumer is not None and (consumer.cancelled() or consumer.get_loop().is_closed()):
            # The consuming task is being cancelled, or died with its loop: unwanted.
            self._abandoned = True
        if self._abandoned:
            self._release()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception as exc:  # a broken callback must not stop the drain
                if loop is not None:
                    loop.call_exception_handler(
                        {"message": f"transfer {self.id} done callback failed", "exception": exc}
                    )
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done() and not future.get_loop().is_closed():
                future.set_result(None)

    def _release(self) -> None:
        """Free the destination of a finished transfer nobody will receive (owned only:
        failed and cancelled owned transfers were freed by the core)."""
        completion = self._completion
        if not self._owned or completion is None or completion.status != "done":
            return
        try:
            self._dst.free(self._handle)
        except (InvalidHandle, BlockPinned):
            pass  # freed by the caller already, or pinned by someone who now holds it

    def __repr__(self) -> str:
        state = self._completion.status if self._completion is not None else "pending"
        return f"TransferTicket(id={self.id}, {state})"


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
        for completion in self.engine.drain():
            if completion.status == "issued":
                # device copies: 'done' follows once the copy stream passed the event
                issued = self._tickets.get(completion.id)
                if issued is not None:
                    issued._issued(completion)
                continue
            ticket = self._tickets.pop(completion.id, None)
            if ticket is not None:
                ticket._resolve(completion, self._loop)

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

"""One submitted transfer as the event loop sees it: awaited by one consumer, observed by any
number of waiters, with done callbacks that run before they wake.

A done callback that raises fails its ticket: `error()` becomes a TransferError naming the
transfer and chained to the callback's exception, and every waiter still wakes (nothing is
logged and forgotten: a waiter never stays behind an exception). The block of an owned
transfer whose callback failed is freed when a consumer was to receive it; a callback's owner
(the expert cache) cleans up after its own callback.

Cancellation is normal control flow. When the task consuming a ticket (`await
ticket`) is cancelled, the transfer is cancelled too: if no part had started, the
core releases its pins and frees an owned destination block at once; if it had
started, the block is freed here when its completion arrives. Nothing leaks either
way. A failed transfer raises the typed exception of its `Completion.error()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Literal

from moeflow._core import PRIORITY_DEMAND, BlockHandle, Completion, CudaEvent, SlabAllocator
from moeflow.errors import BlockPinned, EngineClosed, InvalidHandle, TransferError

if TYPE_CHECKING:
    from moeflow.memory.transfers import AsyncTransfers

__all__ = ["DirectMode", "TransferTicket"]

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
        self._callback_error: TransferError | None = None
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
        if self._callback_error is not None:
            return self._callback_error
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
            try:
                callback(self)
            except Exception as exc:  # the done callbacks still run; the ticket fails
                self._fail(callback, exc)

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
        if self._callback_error is not None:
            self._release()  # the consumer, who would own the block, never receives it
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

    def _resolve(self, completion: Completion) -> None:
        self._completion = completion
        consumer = self._consumer
        if consumer is not None and (consumer.cancelled() or consumer.get_loop().is_closed()):
            # The consuming task is being cancelled, or died with its loop: unwanted.
            self._abandoned = True
        if self._abandoned:
            self._release()
        callbacks, self._callbacks = self._callbacks, []
        try:
            for callback in callbacks:
                try:
                    callback(self)
                except Exception as exc:  # fails the ticket; the drain and the other callbacks go on
                    self._fail(callback, exc)
        finally:
            # Even a BaseException out of a callback leaves no waiter behind.
            waiters, self._waiters = self._waiters, []
            for future in waiters:
                if not future.done() and not future.get_loop().is_closed():
                    future.set_result(None)

    def _fail(self, callback: Callable[..., object], exc: Exception) -> None:
        if self._callback_error is None:
            self._callback_error = TransferError(
                f"transfer {self.id}: completing it failed in {_name(callback)}: {type(exc).__name__}: {exc}"
            )
            self._callback_error.__cause__ = exc

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


def _name(callback: Callable[..., object]) -> str:
    func = getattr(callback, "func", callback)  # functools.partial
    return getattr(func, "__qualname__", repr(func))

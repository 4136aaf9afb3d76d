"""An asyncio event loop on its own thread, and the bridges to it from any other loop or thread.

The engine's step loop lives on one (as vLLM's AsyncLLM keeps its engine core apart): a step
computes for milliseconds to seconds, and on the caller's loop it would stall every other task
there (timers, sockets, heartbeats) for that long. The caller's face only submits and awaits:

- `call(coro)` runs a coroutine there and awaits its result from the calling loop; cancelling the
  caller cancels it there, and the caller's CancelledError comes once it has unwound (its
  `finally` blocks ran: a cancelled request has freed its KV cache and pins, within one step);
- `stream(agen)` runs an async generator there and yields its items here, as they come (the
  generator does not wait for the consumer: tokens never queue behind a slow reader's step);
- `run(coro)` is the blocking form for plain threads (scripts, `moeflow.LLM`).

Code already running on the thread's own loop is run inline by `call` and `stream`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

from moeflow.errors import EngineClosed

T = TypeVar("T")

_ITEM, _ERROR, _END = 0, 1, 2


class _Remote:
    """A task on the thread's loop, started from another thread; `on_done` runs there once it
    is over, cancelled or not."""

    def __init__(self, owner: LoopThread, coro: Coroutine[Any, Any, Any],
                 on_done: Callable[[asyncio.Task[Any]], None]) -> None:
        self.owner = owner
        self.task: asyncio.Task[Any] | None = None

        def start() -> None:  # on the thread's loop
            self.task = owner.loop.create_task(coro)
            self.task.add_done_callback(on_done)

        owner.call_soon(start, coro)

    def cancel(self) -> None:
        """Cancel it at its next await (queued after its start, so never lost)."""
        with contextlib.suppress(RuntimeError):
            self.owner.loop.call_soon_threadsafe(lambda: self.task is not None and self.task.cancel())


class LoopThread:
    """A daemon thread running an event loop until `stop` (or the process ends)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.name = name
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def here(self) -> bool:
        """True when called from this thread (its loop is the running one)."""
        return threading.current_thread() is self._thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def call_soon(self, fn: Callable[[], None], coro: Coroutine[Any, Any, Any]) -> None:
        """fn() on this thread's loop, for work on `coro` (closed unrun if the thread stopped)."""
        self._require_alive(coro)
        self.loop.call_soon_threadsafe(fn)

    def _require_alive(self, coro: Coroutine[Any, Any, Any]) -> None:
        if not self.alive:
            coro.close()
            raise EngineClosed(f"the {self.name} thread has stopped")

    def _failure(self, task: asyncio.Task[Any]) -> BaseException | None:
        """Why a finished task returned nothing: cancelled (only `stop` cancels there: the
        thread stopped), or its exception; None if it returned."""
        if task.cancelled():
            return EngineClosed(f"the {self.name} thread stopped before the call finished")
        return task.exception()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """`await coro` on this thread's loop; see the module doc for cancellation."""
        if self.here:
            return await coro
        caller = asyncio.get_running_loop()
        finished: asyncio.Future[T] = caller.create_future()

        def settle(task: asyncio.Task[T]) -> None:  # on the caller's loop
            if finished.done():
                return
            error = self._failure(task)
            if error is not None:
                finished.set_exception(error)
            else:
                finished.set_result(task.result())

        remote = _Remote(self, coro, lambda task: _post(caller, settle, task))
        try:
            return await asyncio.shield(finished)
        except asyncio.CancelledError:
            if finished.done():
                raise
            remote.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(finished)  # until it has unwound there
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread (not this one) until `coro` has run here; KeyboardInterrupt
        while waiting cancels it."""
        if self.here:
            coro.close()
            raise RuntimeError(f"{self.name}: run() would block its own loop; await call() instead")
        self._require_alive(coro)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except (KeyboardInterrupt, concurrent.futures.CancelledError):
            future.cancel()
            raise

    async def stream(self, agen: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """The items of `agen`, which runs on this thread's loop; closing or cancelling the
        consumer cancels the producer and waits until it has unwound."""
        if self.here:
            async with contextlib.aclosing(agen):
                async for item in agen:
                    yield item
            return
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump() -> None:
            async with contextlib.aclosing(agen):
                async for item in agen:
                    _post(caller, queue.put_nowait, (_ITEM, item))

        def ended(task: asyncio.Task[None]) -> None:  # on the thread's loop, after every item
            error = self._failure(task)
            _post(caller, queue.put_nowait, (_END, None) if error is None else (_ERROR, error))

        remote = _Remote(self, pump(), ended)
        over = False
        try:
            while True:
                kind, value = await queue.get()
                if kind == _ITEM:
                    yield value
                    continue
                over = True
                if kind == _ERROR:
                    raise value
                return
        finally:
            if not over:
                remote.cancel()
                with contextlib.suppress(BaseException):
                    while (await asyncio.shield(queue.get()))[0] == _ITEM:  # until it has unwound there
                        pass

    async def stop(self, timeout: float = 30.0) -> None:
        """Cancel what still runs there, stop the loop and join the thread, without blocking
        the calling loop. From the thread itself, the loop stops once the caller returns."""
        if self.here:
            self.loop.call_soon(self.loop.stop)
            return
        await asyncio.to_thread(self.close, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what still runs there, stop the loop and join the thread; blocks the calling
        thread (a caller on an event loop awaits `stop`)."""
        if self.here:
            raise RuntimeError(f"{self.name}: close() from its own thread; await stop() instead")
        if self.loop.is_closed():
            return
        if self.alive:
            with contextlib.suppress(EngineClosed):
                self.run(_cancel_others())
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """fn(*args) on `loop` (another thread's); nothing if that loop has closed (nobody reads)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def _cancel_others() -> None:
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()

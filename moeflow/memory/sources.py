"""Where an expert cache's loads come from: the store on disk, a pinned host home holding every
expert, or a host cache in front of the disk (the third tier). Each hands back a ticket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from moeflow import _core
from moeflow.errors import EngineClosed, MoeflowError, StoreError, TransferError
from moeflow.memory.transfers import AsyncTransfers, DirectMode, TransferTicket
from moeflow.memory.policies import ExpertKey
from moeflow.store.layout import BlobLayout
from moeflow.store.store import ExpertStore, describe_store_error

if TYPE_CHECKING:
    from moeflow.memory.cache import ExpertCache
    from moeflow.memory.tiers import HostHome


def load_error(path: Path, key: ExpertKey, error: BaseException, described: BaseException | None = None
               ) -> BaseException:
    """The typed error a request gets when loading expert `key` from `path` failed, naming the
    file, layer and expert: `described` (the store's own wording) when given, else a
    TransferError for a failed copy and a StoreError for bytes that landed but could not be
    used (their layout disagrees with the model). Cancellation and closing pass unchanged."""
    if described is not None and described is not error:
        described.__cause__ = error
        return described
    if isinstance(error, (asyncio.CancelledError, EngineClosed)):
        return error
    layer, expert = key
    where = f"{path} (layer {layer}, expert {expert})"
    typed: MoeflowError
    if isinstance(error, TransferError):
        typed = TransferError(f"{where}: {error}")
    elif isinstance(error, MoeflowError):
        return error
    else:
        typed = StoreError(
            f"{where}: the expert's bytes landed but could not be used ({type(error).__name__}: {error}); "
            "if the store's layout disagrees with the model, rebuild it (store_mode='rebuild')", path=str(path))
    typed.__cause__ = error
    return typed


class Ticket(Protocol):
    """What a load returns: a TransferTicket, or a ChainTicket over several transfers."""

    event: _core.CudaEvent | None

    def done(self) -> bool: ...
    def error(self) -> BaseException | None: ...
    def completion(self) -> _core.Completion: ...
    def add_done_callback(self, callback: Callable[[Any], object]) -> None: ...
    def add_issued_callback(self, callback: Callable[[Any], object]) -> None: ...
    async def wait_done(self) -> None: ...


class Source(Protocol):
    layout: BlobLayout

    def submit(self, key: ExpertKey, dst: _core.SlabAllocator, handle: _core.BlockHandle, priority: int,
               after: _core.CudaEvent | None = None) -> Ticket:
        """Load `key` into `handle`; a copy into device memory first waits for `after` (the
        fence of the compute that last read the block)."""
    def cancel(self, ticket: Ticket) -> bool: ...
    def promote(self, ticket: Ticket, priority: int) -> None: ...
    def describe(self, key: ExpertKey, error: BaseException) -> BaseException: ...
    async def aclose(self) -> None: ...


class _TransferSource:
    """Loads that are single transfers of the engine: cancel and promote pass through."""

    transfers: AsyncTransfers

    def cancel(self, ticket: Ticket) -> bool:
        return isinstance(ticket, TransferTicket) and self.transfers.cancel(ticket)

    def promote(self, ticket: Ticket, priority: int) -> None:
        if isinstance(ticket, TransferTicket):
            self.transfers.promote(ticket, priority)


class StoreSource(_TransferSource):
    """Reads blobs from the store file (pread, O_DIRECT when aligned), checking their CRC-32."""

    def __init__(self, store: ExpertStore, transfers: AsyncTransfers, *, direct: DirectMode, verify: bool) -> None:
        self.store = store
        self.layout = store.layout
        self.transfers = transfers
        self.direct: DirectMode = direct
        self.verify = verify
        self.file_id = transfers.register_file(str(store.data_path))

    def submit(self, key: ExpertKey, dst: _core.SlabAllocator, handle: _core.BlockHandle, priority: int,
               after: _core.CudaEvent | None = None) -> Ticket:
        layer, expert = key  # host RAM: compute is synchronous, `after` is always None
        return self.transfers.submit_read(
            self.file_id,
            self.store.offset(layer, expert),
            self.store.blob_size,
            dst,
            handle,
            priority=priority,
            direct=self.direct,
            expect_crc32=self.store.crc32(layer, expert) if self.verify else None,
        )

    def describe(self, key: ExpertKey, error: BaseException) -> BaseException:
        return load_error(self.store.data_path, key, error, describe_store_error(self.store, key, error))

    async def aclose(self) -> None:
        self.transfers.unregister_file(self.file_id)


class HomeSource(_TransferSource):
    """Copies from a pinned host home that holds every expert (host -> device, copy stream)."""

    def __init__(self, home: HostHome, transfers: AsyncTransfers) -> None:
        self.home = home
        self.layout = home.store.layout
        self.transfers = transfers

    def submit(self, key: ExpertKey, dst: _core.SlabAllocator, handle: _core.BlockHandle, priority: int,
               after: _core.CudaEvent | None = None) -> Ticket:
        return self.transfers.submit_copy(
            self.home.allocator, self.home.handle(key), dst, handle, self.layout.size, priority=priority,
            after=after,
        )

    def describe(self, key: ExpertKey, error: BaseException) -> BaseException:
        return load_error(self.home.store.data_path, key, error)

    async def aclose(self) -> None:
        return None


class ChainTicket:
    """A device load through the host cache: wait for the expert in host memory (loading it from
    disk if needed), then copy it to the device. Looks like a TransferTicket to the cache."""

    def __init__(self, run: Callable[[ChainTicket], Coroutine[Any, Any, None]]) -> None:
        self.event: _core.CudaEvent | None = None
        self._completion: _core.Completion | None = None
        self._error: BaseException | None = None
        self._done = asyncio.Event()
        self._callbacks: list[Callable[[Any], object]] = []
        self._issued_callbacks: list[Callable[[Any], object]] = []
        self.copy: TransferTicket | None = None
        self.task = asyncio.ensure_future(run(self))

    def done(self) -> bool:
        return self._done.is_set()

    def error(self) -> BaseException | None:
        return self._error

    def completion(self) -> _core.Completion:
        if self._completion is None:
            raise asyncio.InvalidStateError("the chained load has not finished")
        return self._completion

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        if self.done():
            asyncio.get_running_loop().call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def add_issued_callback(self, callback: Callable[[Any], object]) -> None:
        if self.event is not None:
            asyncio.get_running_loop().call_soon(callback, self)
        else:
            self._issued_callbacks.append(callback)

    async def wait_done(self) -> None:
        await self._done.wait()

    def _issued(self, ticket: TransferTicket) -> None:
        self.event = ticket.event
        for callback in self._issued_callbacks:
            callback(self)
        self._issued_callbacks.clear()

    def _finish(self, completion: _core.Completion | None, error: BaseException | None) -> None:
        self._completion, self._error = completion, error
        self._done.set()
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()


class HostCacheSource:
    """Three tiers: a device cache whose loads come through a host cache with the disk behind it."""

    def __init__(self, host: ExpertCache, transfers: AsyncTransfers) -> None:
        self.host = host
        self.layout = host.source.layout
        self.transfers = transfers

    def submit(self, key: ExpertKey, dst: _core.SlabAllocator, handle: _core.BlockHandle, priority: int,
               after: _core.CudaEvent | None = None) -> Ticket:
        async def run(chain: ChainTicket) -> None:
            try:
                # Pinned in host memory until the copy has landed: no disk read can reuse the
                # host block while the copy engine still reads it.
                entry = await self.host.acquire(key)
                try:
                    chain.copy = self.transfers.submit_copy(
                        self.host.tier.allocator, entry.handle, dst, handle, self.layout.size,
                        priority=priority, owned=True, after=after,
                    )
                    chain.copy.add_issued_callback(chain._issued)
                    await chain.copy.wait_done()
                finally:
                    self.host.release(key)
                error = chain.copy.error()
                chain._finish(chain.copy.completion() if error is None else None, error)
            except BaseException as e:
                if chain.copy is None:  # never submitted: the device block is ours to free
                    dst.free(handle)
                chain._finish(None, e)
                if not isinstance(e, Exception):
                    raise

        return ChainTicket(run)

    def cancel(self, ticket: Ticket) -> bool:
        return False  # a chained load always runs to completion (its block is then evictable)

    def promote(self, ticket: Ticket, priority: int) -> None:
        if isinstance(ticket, ChainTicket) and ticket.copy is not None:
            self.transfers.promote(ticket.copy, priority)

    def describe(self, key: ExpertKey, error: BaseException) -> BaseException:
        if isinstance(error, StoreError):
            return error  # the host cache's load failed: described there already
        return self.host.source.describe(key, error)

    async def aclose(self) -> None:
        await self.host.aclose()

"""`moeflow serve`: one Engine behind uvicorn, drained for a bounded time on SIGTERM, closed on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from moeflow.serve.app import create_app

if TYPE_CHECKING:
    from moeflow.api import Engine


def _server_class() -> type:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises a caught SIGINT/SIGTERM once it has stopped, and the default handler
        would kill the process before the engine closes: the signal has done its work (the drain)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return _Server


async def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                max_queue: int | None = None, drain_seconds: int = 30, log_level: str = "info") -> None:
    """Open `engine`, serve it until SIGINT/SIGTERM, then close it. On the signal uvicorn stops
    accepting, lets in-flight requests finish for up to `drain_seconds`, then cancels the rest
    (each cancelled request frees its KV and pins); the engine closes after that."""
    import uvicorn

    async with engine:
        app = create_app(engine, model_name=model_name, max_queue=max_queue)
        name = app.state.openai_server.model_name
        print(f"moeflow serve: {name} on http://{host}:{port}/v1, context "
              f"{engine.session.arch.max_position_embeddings} tokens\nmoeflow serve: {engine.session.plan_line()}",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                timeout_graceful_shutdown=drain_seconds)
        await _server_class()(config).serve()
    print(f"moeflow serve: stopped, engine for {engine.path} closed", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def running(app: Any, *, lifespan: Literal["auto", "on", "off"] = "off") -> AsyncIterator[str]:
    """`app` served by uvicorn on 127.0.0.1 (a free port) in this loop, for tests and benches;
    yields its base URL and stops the server on the way out."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan=lifespan, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it did not start
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task

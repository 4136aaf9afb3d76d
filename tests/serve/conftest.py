"""Fixtures of the server tests: a tiny synthesized checkpoint with a ChatML template, engines over it, live uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthesized mixtral (tokenizer.json included) with a ChatML tokenizer_config.json."""
    from moeflow.models.synth import synthesize

    out = tmp_path_factory.mktemp("serve") / "tiny-mixtral"
    synthesize(out, "mixtral", "tiny", dtype=torch.float32, progress=False)
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    return out


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that change the checkpoint's files."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns(".moeflow"))
    return out


def engine_options(**extra: Any) -> dict[str, Any]:
    return {"progress": False, **extra}


@contextlib.asynccontextmanager
async def live_server(app: Any, *, lifespan: str = "off") -> AsyncIterator[str]:
    """`app` served by uvicorn on 127.0.0.1 (a free port) in this loop; yields its base URL."""
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


async def wait_idle(engine: Any, timeout: float = 10.0) -> tuple[int, int]:
    """(pinned_blocks, kv_reserved) once both are 0, or their values when `timeout` passes: a
    cancelled request frees its pins and KV within one engine step, not at once."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        pinned = engine.stats()["pinned_blocks"]
        reserved = await engine.call(lambda: engine._batcher.kv_reserved)
        if (pinned == 0 and reserved == 0) or asyncio.get_running_loop().time() > deadline:
            return pinned, reserved
        await asyncio.sleep(0.05)

"""Fixtures of the server tests: a tiny synthesized checkpoint with a ChatML template, engines over it, live uvicorn servers."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow.serve.server import running

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


live_server = running  # uvicorn on a free port of 127.0.0.1, yielding the base URL


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

"""moeflow.LLM: blocking calls over an engine on its own loop, equal to the async API."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from moeflow import LLM, Engine
from moeflow.errors import CheckpointError, InvalidRequest
from tests.conftest import HFCheckpoints

PROMPTS = [[5, 17, 42, 3], [9, 8, 7], [1, 2, 3, 4, 5]]


@pytest.mark.timeout(120)
def test_llm_generates_what_the_async_engine_generates(hf_checkpoints: HFCheckpoints, tmp_path: Path) -> None:
    path = hf_checkpoints.path("qwen2_moe")

    async def solo() -> list[list[int]]:
        async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
            return [(await eng.generate(p, 6, temperature=0.7, seed=11)).tokens for p in PROMPTS]

    want = asyncio.run(solo())
    with LLM(path, device="cpu", expert_budget="50%") as llm:
        got = llm.generate(PROMPTS, 6, temperature=0.7, seed=11)
        assert [r.tokens for r in got] == want
        one = llm.generate(PROMPTS[1], 6, temperature=0.7, seed=11)  # token ids: one prompt
        assert [r.tokens for r in one] == [want[1]]
        assert [r.tokens for r in llm.generate(PROMPTS, 6, concurrency=1, temperature=0.7, seed=11)] == want
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": 6}) + "\n" for p in PROMPTS))
        summary = llm.run_file(inp, tmp_path / "out.jsonl", temperature=0.7, seed=11)
        assert summary.done == 3
        assert llm.stats()["pinned_blocks"] == 0
    assert not any(t.name == "moeflow-llm" for t in threading.enumerate())
    with pytest.raises(InvalidRequest, match="closed"):
        llm.generate(PROMPTS, 2)
    llm.close()  # idempotent


@pytest.mark.timeout(120)
def test_llm_works_where_an_event_loop_is_already_running(hf_checkpoints: HFCheckpoints) -> None:
    path = hf_checkpoints.path("mixtral")

    async def notebook_cell() -> list[int]:  # Jupyter runs cells inside a loop
        with LLM(path, device="cpu") as llm:
            return llm.generate([[3, 4, 5]], 4)[0].tokens

    assert len(asyncio.run(notebook_cell())) == 4


def test_a_refused_open_stops_the_thread(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        LLM(tmp_path / "missing")
    assert not any(t.name == "moeflow-llm" for t in threading.enumerate())

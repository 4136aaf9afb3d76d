"""The engine steps on its own thread: the caller's event loop stays free, cancels land within a step."""

from __future__ import annotations

import asyncio
import threading
import time

from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.errors import EngineClosed
from tests.conftest import HFCheckpoints

LONG_PROMPT = [(7 * i + 3) % 500 + 3 for i in range(2000)]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mixtral-shaped model wide enough that a 2000-token prompt's pass computes for a while."""
    from moeflow.models.synth import synthesize

    out = tmp_path_factory.mktemp("wide") / "mixtral"
    synthesize(out, "mixtral", "tiny", dtype=torch.float32, progress=False, hidden_size=256, intermediate_size=512,
               num_hidden_layers=4, max_position_embeddings=4096)
    return out


async def _heartbeat(period: float, gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(period)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def _streaming(eng: Engine, max_new_tokens: int, *, until: int) -> tuple[asyncio.Task[None], list[int]]:
    """A task streaming a long generation into a list, once `until` tokens have arrived."""
    got: list[int] = []

    async def consume() -> None:
        async for tok in eng.stream([9, 10, 11], max_new_tokens, stop_at_eos=False):
            got.append(tok)

    task = asyncio.create_task(consume())
    while len(got) < until:
        await asyncio.sleep(0.001)
    return task, got


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_a_heartbeat_on_the_callers_loop_keeps_its_period_during_a_long_generate(wide_model: Path) -> None:
    """A 10 ms heartbeat beside a full-budget generate (a 2000-token prompt in one pass, then
    200 tokens): the median beat is on time and none is late by half the prompt's pass, which
    computes for far longer than a beat (on the caller's loop it held the loop for all of it)."""
    async with Engine.open(wide_model, device="cpu", prefill_chunk=2048) as eng:
        await eng.generate(LONG_PROMPT[:8], 2)  # warm up
        gaps: list[float] = []
        stop = asyncio.Event()
        beat = asyncio.create_task(_heartbeat(0.010, gaps, stop))
        started = time.perf_counter()
        stream = eng.stream(LONG_PROMPT, 200, stop_at_eos=False)
        first = None
        count = 0
        async for _ in stream:
            first = first or time.perf_counter() - started
            count += 1
        total = time.perf_counter() - started
        stop.set()
        await beat
    assert count == 200 and first is not None
    assert first > 0.1, f"the prompt's pass took {first:.3f} s: too short to show a blocked loop"
    gaps.sort()
    late = [g - 0.010 for g in gaps]
    assert len(gaps) > 0.5 * total / 0.010, (len(gaps), total)
    # Against the prompt's pass measured in the same run (a blocked loop would be late by all of
    # it), not a fixed figure: on a loaded machine the OS alone can delay one beat by 100+ ms.
    median = late[len(late) // 2]
    assert late[-1] < 0.5 * first and median < 0.010, (
        f"heartbeat late by up to {late[-1] * 1e3:.1f} ms (median {median * 1e3:.1f} ms) "
        f"beside a {first * 1e3:.0f} ms prompt pass"
    )


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_cancel_takes_effect_within_a_step_and_frees_everything_at_once(hf_checkpoints: HFCheckpoints) -> None:
    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu", expert_budget="50%",
                           kv_budget=1 << 30) as eng:
        solo = await eng.generate([5, 6, 7], 20)
        task, got = await _streaming(eng, 2000, until=20)
        per_step = solo.stats["seconds"] / 20 if solo.stats["seconds"] else 0.01
        asked = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.perf_counter() - asked
        # the request has unwound on the engine thread: its KV room, pins and schedule are free
        stats = eng.stats()
        assert stats["pinned_blocks"] == 0 and stats["loads_in_flight"] == 0
        assert eng._batcher is not None and eng._batcher.kv_reserved == 0 and eng._batcher.waiting == 0
        assert eng.session.scheduler.live == []
        assert len(got) < 2000
        assert took < 20 * per_step + 0.5, f"cancel took {took:.3f} s at {per_step * 1e3:.1f} ms per step"
        again = await eng.generate([5, 6, 7], 20)
    assert again.tokens == solo.tokens


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_one_engine_serves_callers_on_other_loops_and_threads(hf_checkpoints: HFCheckpoints) -> None:
    async with Engine.open(hf_checkpoints.path("olmoe"), device="cpu", expert_budget="50%") as eng:
        assert await eng.call(lambda: threading.current_thread().name) == "moeflow-engine"
        want = (await eng.generate([4, 5, 6], 12)).tokens

        def elsewhere() -> list[int]:  # a plain thread with its own event loop
            return asyncio.run(eng.generate([4, 5, 6], 12)).tokens

        here = asyncio.create_task(eng.generate([4, 5, 6], 12))
        there = await asyncio.gather(*(asyncio.to_thread(elsewhere) for _ in range(3)))
        assert (await here).tokens == want and there == [want] * 3
    assert not [t for t in threading.enumerate() if t.name == "moeflow-engine"]  # the thread ended
    with pytest.raises(EngineClosed):
        await eng.generate([4, 5, 6], 2)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_close_fails_waiting_streams_and_ends_the_thread(hf_checkpoints: HFCheckpoints) -> None:
    eng = await Engine.open(hf_checkpoints.path("mixtral"), device="cpu", expert_budget="50%")
    task, _ = await _streaming(eng, 5000, until=5)
    await asyncio.wait_for(eng.aclose(), 10)
    with pytest.raises(EngineClosed):
        await asyncio.wait_for(task, 10)
    assert not [t for t in threading.enumerate() if t.name == "moeflow-engine"]

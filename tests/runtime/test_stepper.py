"""Continuous batching: concurrent requests step together, each gets its solo tokens; KV admission queues."""

from __future__ import annotations

import asyncio
import random

import pytest

from moeflow import Engine
from moeflow.runtime.runner import ModelRunner
from moeflow.runtime.sampling import Sampler, SamplingParams
from moeflow.runtime.stepper import StepBatcher, StepRecord
from tests.conftest import HFCheckpoints


async def _greedy(batcher: StepBatcher | None, runner: ModelRunner, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens, solo through runner.forward (batcher None) or batched."""
    seq = runner.new_sequence(prompt)
    tokens: list[int] = []
    try:
        ids = prompt
        for _ in range(n):
            if batcher is None:
                tokens.append(int((await runner.forward(seq, ids))[-1].argmax()))
            else:
                outcome = await batcher.run(seq, ids, sampler=Sampler(SamplingParams()))
                assert outcome.token is not None and outcome.logits is None
                tokens.append(outcome.token)
            ids = [tokens[-1]]
    finally:
        if batcher is None:
            seq.finish()
        else:
            await batcher.finish(seq)
    return tokens


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_concurrent_requests_step_together_and_each_gets_its_solo_tokens(hf_checkpoints: HFCheckpoints) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randrange(1, 30))] for _ in range(24)]
    lengths = [rng.randrange(1, 12) for _ in prompts]
    async with Engine.open(hf_checkpoints.path("olmoe"), device="cpu", expert_budget="25%") as eng:
        steps: list[StepRecord] = []
        batcher = StepBatcher(eng.session.runner, asyncio.Lock(), max_tokens=16, max_sequences=8, on_step=steps.append,
                              snapshot=eng.session.counters_snapshot, end_step=eng.session.end_step)

        async def scenario() -> tuple[list[list[int]], list[list[int]]]:  # on the engine thread, which owns the runner
            runner = eng.session.runner
            solo = [await _greedy(None, runner, p, n) for p, n in zip(prompts, lengths, strict=True)]
            tasks = [asyncio.create_task(_greedy(batcher, runner, p, n)) for p, n in zip(prompts, lengths, strict=True)]
            # a few are cancelled midway: the others are unaffected and nothing stays pinned
            victims = [asyncio.create_task(_greedy(batcher, runner, p, 40)) for p in prompts[:4]]
            await asyncio.sleep(0.05)
            for v in victims:
                v.cancel()
            got = await asyncio.gather(*tasks)
            await asyncio.gather(*victims, return_exceptions=True)
            assert all(v.cancelled() for v in victims)
            return solo, got

        solo, got = await eng.call(scenario)
        assert eng.stats()["pinned_blocks"] == 0
    assert got == solo
    assert max(s.sequences for s in steps) == 8 and max(s.tokens for s in steps) <= 16
    assert batcher.steps < sum(lengths)  # requests shared steps
    assert batcher.waiting == 0


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_requests_wait_for_kv_room_and_one_larger_than_the_budget_is_refused(
    hf_checkpoints: HFCheckpoints,
) -> None:
    from moeflow.errors import InvalidRequest

    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu") as eng:
        batcher = StepBatcher(eng.session.runner, asyncio.Lock(), max_tokens=8, max_sequences=4,
                              kv_budget=1000, kv_bytes_per_token=10)
        first = await batcher.admit(60)
        second = asyncio.create_task(batcher.admit(50))  # 600 + 500 > 1000: waits
        await asyncio.sleep(0.02)
        assert not second.done()
        await batcher.release(first)
        assert await asyncio.wait_for(second, 5) == 500 and batcher.kv_reserved == 500
        with pytest.raises(InvalidRequest, match="kv_budget=1000"):
            await batcher.admit(101)

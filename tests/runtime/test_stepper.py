"""Continuous batching: concurrent requests step together, each gets its solo tokens; KV admission queues."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

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
    # a step holds max_tokens, or a prompt's first pass beside the decode tokens
    assert max(s.sequences for s in steps) == 8 and max(s.tokens for s in steps) <= 8 + max(map(len, prompts))
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


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_prompt_runs_the_passes_it_runs_alone_so_its_logits_are_bitwise_the_same(
    hf_checkpoints: HFCheckpoints,
) -> None:
    """Two 6-token prompts arrive together with room for 8 tokens a step: the second waits for
    the next step whole (cut into 2 + 4 it attended over a chunk, which rounds differently), and
    both get, bit for bit, the logits of their solo runs."""
    prompts = [[5, 17, 42, 3, 77, 12], [9, 8, 60, 31, 8, 12]]
    async with Engine.open(hf_checkpoints.path("qwen2_moe"), device="cpu") as eng:
        steps: list[StepRecord] = []
        batcher = StepBatcher(eng.session.runner, asyncio.Lock(), max_tokens=8, max_sequences=4, on_step=steps.append)

        async def logits(prompt: list[int]) -> torch.Tensor:
            seq = eng.session.runner.new_sequence(prompt)
            try:
                outcome = await batcher.run(seq, prompt, all_logits=True)
            finally:
                await batcher.finish(seq)
            assert outcome.logits is not None
            return outcome.logits

        async def scenario() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            solo = [await logits(p) for p in prompts]
            return solo, list(await asyncio.gather(*(logits(p) for p in prompts)))

        solo, together = await eng.call(scenario)
    assert [s.tokens for s in steps] == [6, 6, 6, 6]  # each prompt's one pass, whole
    for want, got in zip(solo, together, strict=True):
        assert torch.equal(want, got)

"""The async API: lifecycle, concurrent requests, streaming, sampling, stats."""

from __future__ import annotations

import asyncio

import pytest

from moeflow import Engine, EngineState
from moeflow.errors import EngineClosed

PROMPTS = [[5, 17, 42, 3], [9, 9, 1, 30, 44], [70, 2, 11], [12, 13, 14, 15, 16, 17]]


@pytest.mark.asyncio
async def test_concurrent_generates_each_get_their_own_result(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("qwen3_moe")
    async with Engine.open(path, expert_budget="50%", device="cpu") as eng:
        alone = [(await eng.generate(p, 8, stop_at_eos=False)).tokens for p in PROMPTS]
        sampled = (await eng.generate(PROMPTS[0], 8, temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False)).tokens
        together = await asyncio.gather(
            *(eng.generate(p, 8, stop_at_eos=False) for p in PROMPTS),
            eng.generate(PROMPTS[0], 8, temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False),
        )
        assert [r.tokens for r in together[:-1]] == alone
        assert together[-1].tokens == sampled
        assert eng.stats()["pinned_blocks"] == 0


@pytest.mark.asyncio
async def test_stream_yields_the_generate_tokens(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("olmoe")
    async with Engine.open(path, expert_budget="50%", device="cpu") as eng:
        expected = (await eng.generate(PROMPTS[1], 6, stop_at_eos=False)).tokens
        got = [t async for t in eng.stream(PROMPTS[1], 6, stop_at_eos=False)]
        assert got == expected


@pytest.mark.asyncio
async def test_lifecycle_states_and_closed_engine_refuses(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    eng = Engine.open(hf_checkpoints.path("mixtral"), device="cpu")
    assert eng.state is EngineState.CREATED
    async with eng:
        assert eng.state is EngineState.READY
        stats = eng.stats()
        assert stats["blocks_in_use"] == 0 and stats.as_dict()["tokens"] == 0
    assert eng.state is EngineState.CLOSED
    with pytest.raises(EngineClosed):
        await eng.generate([1, 2], 2)


@pytest.mark.asyncio
async def test_sampling_is_reproducible_with_a_seed(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu") as eng:
        a = await eng.generate(PROMPTS[2], 10, temperature=1.0, top_k=20, seed=3, stop_at_eos=False)
        b = await eng.generate(PROMPTS[2], 10, temperature=1.0, top_k=20, seed=3, stop_at_eos=False)
        assert a.tokens == b.tokens
        assert a.stats["tokens"] == 10 and a.finish_reason == "length"


@pytest.mark.asyncio
async def test_a_stream_abandoned_early_ends_its_sequence(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    import contextlib

    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu", expert_budget="50%") as eng:
        async with contextlib.aclosing(eng.stream(PROMPTS[0], 50, stop_at_eos=False)) as stream:
            async for tok in stream:
                assert isinstance(tok, int)
                assert eng.session.scheduler.live  # the sequence is running
                break
        assert eng.session.scheduler.live == []  # ended at close, not at garbage collection
        assert eng.stats()["pinned_blocks"] == 0

"""Concurrent requests on one Engine step together: each gets its solo tokens; KV admission queues."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.errors import InvalidRequest
from tests.conftest import HFCheckpoints


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_64_concurrent_requests_some_cancelled_equal_their_solo_runs(hf_checkpoints: HFCheckpoints) -> None:
    rng = random.Random(7)
    requests = [([rng.randrange(3, 90) for _ in range(rng.randrange(1, 40))], rng.randrange(1, 16),
                 rng.choice([0.0, 0.0, 0.8]), rng.randrange(1000)) for _ in range(64)]
    path = hf_checkpoints.path("qwen2_moe")
    async with Engine.open(path, device="cpu", expert_budget="30%", prefill_chunk=24) as eng:
        solo = [(await eng.generate(p, n, temperature=t, seed=s)).tokens for p, n, t, s in requests]
        steps_before = eng.session.steps
        tasks = [asyncio.create_task(eng.generate(p, n, temperature=t, seed=s)) for p, n, t, s in requests]
        doomed = [asyncio.create_task(eng.generate(p, 60)) for p, _, _, _ in requests[:6]]
        await asyncio.sleep(0.2)
        for task in doomed:
            task.cancel()
        results = await asyncio.gather(*tasks)
        await asyncio.gather(*doomed, return_exceptions=True)
        assert all(t.cancelled() for t in doomed)
        steps = eng.session.steps - steps_before
        stats = eng.stats()
        assert stats["pinned_blocks"] == 0 and stats["loads_in_flight"] == 0
        assert eng._batcher is not None and eng._batcher.waiting == 0 and eng._batcher.kv_reserved == 0
    assert [r.tokens for r in results] == solo
    assert steps < sum(len(r.tokens) for r in results) / 4  # many requests shared each step


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_requests_beyond_the_kv_budget_wait_instead_of_failing(hf_checkpoints: HFCheckpoints) -> None:
    path = hf_checkpoints.path("mixtral")
    async with Engine.open(path, device="cpu") as probe:
        per_token = probe.session.runner.kv_bytes_per_token()
        want = [(await probe.generate([4 + i, 9, 2], 12)).tokens for i in range(6)]
    budget = per_token * 30  # room for two requests of 3 + 12 positions
    async with Engine.open(path, device="cpu", kv_budget=budget) as eng:
        batcher = eng._batcher
        assert batcher is not None
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, batcher.kv_reserved)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            got = await asyncio.gather(*(eng.generate([4 + i, 9, 2], 12) for i in range(6)))
        finally:
            watcher.cancel()
        assert [r.tokens for r in got] == want
        assert peak == budget  # two at a time, never three
        with pytest.raises(InvalidRequest, match="kv_budget"):
            await eng.generate([1, 2, 3], 40)  # 43 positions can never fit
        assert batcher.kv_reserved == 0


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_batching_does_not_change_a_bf16_models_greedy_tokens(tmp_path: Path) -> None:
    """bf16 rounds at every op: a token must get the same arithmetic alone or batched (on the
    trained model, 3 of 16 prompts once changed tokens when single-token steps took a fused path)."""
    from moeflow import corpus

    model = Path(__file__).resolve().parents[2] / "benches" / "models" / "olmoe-stdlib"
    options = dict(device="cpu", expert_budget="25%", store_dir=str(tmp_path / "stores"))
    async with Engine.open(model, **options) as eng:
        prompts = [eng.encode(t)[:48] for t in corpus.snippets("heldout", 16, 200)]
        solo = [(await eng.generate(p, 40, stop_at_eos=False)).tokens for p in prompts]
        batched = [r.tokens for r in await eng.generate_batch(prompts, 40, stop_at_eos=False)]
    assert batched == solo

"""The GPU configuration gives the CPU's tokens: device tier, pinned home, three tiers, kernels."""

from __future__ import annotations

import pytest

from moeflow import Engine

PROMPT = [5, 17, 42, 3, 77, 12]


async def _tokens(path, **options):  # type: ignore[no-untyped-def]
    async with Engine.open(path, **options) as eng:
        res = await eng.generate(PROMPT, 10, stop_at_eos=False)
        assert eng.stats()["pinned_blocks"] == 0
        return res.tokens, eng.stats()


@pytest.mark.gpu
@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
async def test_gpu_tokens_match_cpu_at_every_budget(hf_checkpoints, family) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path(family)
    want, _ = await _tokens(path, device="cpu")
    for budget in ("30%", "60%", "100%"):
        got, stats = await _tokens(path, device="cuda", expert_budget=budget)
        assert stats["device"] == "cuda"
        assert got == want, budget


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_three_tiers_on_gpu(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("olmoe")
    want, _ = await _tokens(path, device="cpu")
    got, stats = await _tokens(path, device="cuda", expert_budget="30%", host_budget="50%")
    assert got == want and stats["misses"] > 0


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_quantized_experts_on_gpu_match_the_cpu_reference(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("mixtral")
    async with Engine.open(path, device="cpu", precision="int8-g16") as eng:
        want = await eng.logits(PROMPT)
    async with Engine.open(path, device="cuda", precision="int8-g16", dtype="bfloat16") as eng:
        got = await eng.logits(PROMPT)
    assert (got.cpu() - want).abs().max() / want.abs().max() < 5e-2

"""A store in another float dtype than the compute (precision="bfloat16", dtype="float32": half the
expert bytes, float32 arithmetic): the experts are cast per use, for plain SiLU experts and
GPT-OSS's biased clamped ones. It used to fail in the first expert with a dtype mismatch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moeflow import Engine
from tests.hf_models import PROMPT


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_bfloat16_store_under_float32_compute(family: str, hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path(family)

    async def run(precision: str, budget: object = None) -> torch.Tensor:
        if budget == "smallest":  # the top-k of one layer
            async with Engine.open(path, device="cpu", dtype="float32", precision=precision) as eng:
                budget = eng.plan.min_budget_bytes
        async with Engine.open(path, device="cpu", dtype="float32", precision=precision, expert_budget=budget) as eng:
            logits = await eng.logits(PROMPT)
            assert logits.dtype == torch.float32
            return logits

    exact = asyncio.run(run("float32"))
    half = asyncio.run(run("bfloat16"))
    assert (half - exact).abs().max() <= 1e-2 * exact.abs().max()  # bf16 weights, float32 arithmetic
    assert not torch.equal(half, exact)  # the store really is bf16
    assert torch.equal(asyncio.run(run("bfloat16", "smallest")), half)  # every budget, the same bits

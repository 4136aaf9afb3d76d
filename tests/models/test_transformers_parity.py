"""Every family against transformers' own forward on the same weights, at every budget."""

from __future__ import annotations

import pytest
import torch

from moeflow import Engine
from tests.hf_models import FAMILIES, PROMPT, hf_reference, load_hf

def _reference(path):  # type: ignore[no-untyped-def]
    return hf_reference(load_hf(path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.asyncio
async def test_logits_and_greedy_tokens_match_transformers_at_every_budget(hf_checkpoints, family):  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path(family)
    ref_logits, ref_tokens = _reference(path)
    async with Engine.open(path, device="cpu") as eng:
        block, top_k, total = eng.plan.block_bytes, eng.plan.top_k, eng.plan.total_expert_bytes
    smallest = block * top_k
    budgets = {"smallest": smallest, "middle": (smallest + total) // 2, "full": total}
    for name, budget in budgets.items():
        async with Engine.open(path, expert_budget=budget, device="cpu") as eng:
            logits = await eng.logits(PROMPT)
            rel = (logits - ref_logits).abs().max() / ref_logits.abs().max()
            assert rel < 1e-4, f"{family} at {name} budget: logits differ by {rel:.2e} (relative)"
            res = await eng.generate(PROMPT, 12)
            assert res.tokens == ref_tokens, f"{family} at {name} budget"
            stats = eng.stats()
            assert stats["pinned_blocks"] == 0
            if name == "smallest":
                assert stats["misses"] > 0 and stats["evictions"] > 0


@pytest.mark.asyncio
async def test_budget_below_one_layers_top_k_is_refused_naming_the_minimum(hf_checkpoints):  # type: ignore[no-untyped-def]
    from moeflow.errors import ConfigError

    path = hf_checkpoints.path("mixtral")
    async with Engine.open(path, device="cpu") as eng:
        minimum = eng.plan.min_budget_bytes
    with pytest.raises(ConfigError, match=f"minimum of {minimum} bytes"):
        async with Engine.open(path, expert_budget=minimum - 1, device="cpu"):
            pass

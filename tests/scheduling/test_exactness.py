"""Prediction only changes speed: every predictor and policy, at every budget, gives the full-budget tokens."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.config import POLICIES
from tests.scheduling.conftest import PROMPTS

PREDICTORS = ("none", "last-token", "gate-lookahead", "eam", "expertflow")


async def _tokens(path: Path, **options: object) -> tuple[list[list[int]], dict[str, object]]:
    async with Engine.open(path, device="cpu", **options) as eng:
        out = [(await eng.generate(eng.encode(p), 10, stop_at_eos=False)).tokens for p in PROMPTS[:3]]
        stats = eng.stats()
        assert stats["pinned_blocks"] == 0
        return out, stats.as_dict()


@pytest.mark.asyncio
async def test_every_predictor_and_policy_gives_the_full_budget_tokens(predictor_model: Path) -> None:
    reference, _ = await _tokens(predictor_model, expert_budget="100%", prefetch="none")
    async with Engine.open(predictor_model, device="cpu") as eng:
        smallest = eng.plan.min_budget_bytes
    issued = dict.fromkeys(PREDICTORS, 0)
    for budget, predictor, policy in itertools.product((smallest, "25%", "50%"), PREDICTORS, POLICIES):
        got, stats = await _tokens(predictor_model, expert_budget=budget, prefetch=predictor, policy=policy)
        assert got == reference, f"budget={budget} prefetch={predictor} policy={policy}"
        assert stats["prefetch"] == predictor
        issued[predictor] += stats["prefetch_issued"]
    # Every predictor did load ahead somewhere in the sweep (so the runs above exercised it).
    # last-token's guesses, the previous token's experts, are usually still resident.
    assert issued["none"] == 0
    assert all(issued[p] > 0 for p in ("gate-lookahead", "eam", "expertflow")), issued


@pytest.mark.asyncio
async def test_split_budget_and_deeper_prefetch_keep_the_tokens(predictor_model: Path) -> None:
    reference, _ = await _tokens(predictor_model, expert_budget="100%", prefetch="none")
    for options in (
        {"budget_split": "plec", "prefetch": "expertflow"},
        {"prefetch_depth": 4, "prefetch": "gate-lookahead", "policy": "predicted"},
        {"prefetch_depth": 1, "prefetch": "last-token", "policy": "hobbit"},
    ):
        got, _ = await _tokens(predictor_model, expert_budget="25%", **options)
        assert got == reference, options

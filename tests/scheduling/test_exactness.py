"""Prediction only changes speed: every predictor and policy, at every budget, gives the full-budget tokens.

Two tiers. The fast tier runs a representative subset: every predictor, every policy and the
minimum, middle and full budgets each at least once. The full cross product (3 budgets x 5
predictors x 6 policies = 90 engine runs) is marked `slow`; `make test` (CI) runs both.
Only the fast tier: `pytest -m "not slow" tests/scheduling/test_exactness.py`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.config import POLICIES
from tests.scheduling.conftest import PROMPTS

PREDICTORS = ("none", "last-token", "gate-lookahead", "eam", "expertflow")
MIN = "min"  # stands for the model's smallest budget (one layer's top-k), read when the engine opens
# (budget, predictor, policy): each predictor, each policy, and each of min / mid / full budget at least once.
FAST = [
    (MIN, "gate-lookahead", "hobbit"),
    (MIN, "none", "lfu"),
    ("25%", "eam", "predicted"),
    ("25%", "last-token", "mrs"),
    ("50%", "expertflow", "shallow"),
    ("100%", "expertflow", "lru"),
]


@dataclass(frozen=True)
class Reference:
    tokens: list[list[int]]  # full budget, no prefetch
    min_budget: int


async def _tokens(path: Path, **options: object) -> tuple[list[list[int]], dict[str, object]]:
    async with Engine.open(path, device="cpu", **options) as eng:
        out = [(await eng.generate(eng.encode(p), 10, stop_at_eos=False)).tokens for p in PROMPTS[:3]]
        stats = eng.stats()
        assert stats["pinned_blocks"] == 0
        return out, stats.as_dict()


@pytest.fixture(scope="module")
def reference(predictor_model: Path) -> Reference:
    async def run() -> Reference:
        tokens, _ = await _tokens(predictor_model, expert_budget="100%", prefetch="none")
        async with Engine.open(predictor_model, device="cpu") as eng:
            return Reference(tokens, eng.plan.min_budget_bytes)

    return asyncio.run(run())


def _budget(budget: str, reference: Reference) -> str | int:
    return reference.min_budget if budget == MIN else budget


def test_fast_tier_covers_every_predictor_policy_and_budget_kind() -> None:
    budgets, predictors, policies = (set(column) for column in zip(*FAST, strict=True))
    assert predictors == set(PREDICTORS)
    assert policies == set(POLICIES)
    assert {MIN, "100%"} <= budgets and budgets - {MIN, "100%"}


@pytest.mark.parametrize(("budget", "predictor", "policy"), FAST)
@pytest.mark.asyncio
async def test_predictor_and_policy_give_the_full_budget_tokens(
    budget: str, predictor: str, policy: str, predictor_model: Path, reference: Reference
) -> None:
    got, stats = await _tokens(predictor_model, expert_budget=_budget(budget, reference), prefetch=predictor,
                               policy=policy)
    assert got == reference.tokens
    assert stats["prefetch"] == predictor
    if predictor == "none":
        assert stats["prefetch_issued"] == 0
    elif budget in ("25%", "50%") and predictor != "last-token":
        # At the smallest budget no slot is spare to load into ahead, and last-token's guesses (the
        # previous token's experts) are usually resident: elsewhere the run must have loaded ahead.
        assert stats["prefetch_issued"] > 0, "the run did not exercise the predictor"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_every_predictor_and_policy_gives_the_full_budget_tokens(predictor_model: Path,
                                                                       reference: Reference) -> None:
    issued = dict.fromkeys(PREDICTORS, 0)
    for budget, predictor, policy in itertools.product((MIN, "25%", "50%"), PREDICTORS, POLICIES):
        got, stats = await _tokens(predictor_model, expert_budget=_budget(budget, reference), prefetch=predictor,
                                   policy=policy)
        assert got == reference.tokens, f"budget={budget} prefetch={predictor} policy={policy}"
        assert stats["prefetch"] == predictor
        issued[predictor] += stats["prefetch_issued"]
    # Every predictor did load ahead somewhere in the sweep (so the runs above exercised it).
    # last-token's guesses, the previous token's experts, are usually still resident.
    assert issued["none"] == 0
    assert all(issued[p] > 0 for p in ("gate-lookahead", "eam", "expertflow")), issued


@pytest.mark.asyncio
async def test_split_budget_and_deeper_prefetch_keep_the_tokens(predictor_model: Path, reference: Reference) -> None:
    for options in (
        {"budget_split": "plec", "prefetch": "expertflow"},
        {"prefetch_depth": 4, "prefetch": "gate-lookahead", "policy": "predicted"},
        {"prefetch_depth": 1, "prefetch": "last-token", "policy": "hobbit"},
    ):
        got, _ = await _tokens(predictor_model, expert_budget="25%", **options)
        assert got == reference.tokens, options

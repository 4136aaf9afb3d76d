"""Every family with every predictor that needs no training, every policy, the smallest, a middle
and a larger budget: the tokens of the full-budget run, on the CPU and on the simulated GPU.
(The trained routing-path predictor, `expertflow`, needs a model with recorded traces: it is swept
on the trained model in test_exactness.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.config import POLICIES
from tests.hf_models import FAMILIES, PROMPT

MIN = "min"
# each untrained predictor and each policy at least once, each budget kind at least twice
COMBOS = [
    (MIN, "gate-lookahead", "hobbit", "cpu"),
    (MIN, "none", "lfu", "cpu"),
    ("25%", "eam", "predicted", "cpu"),
    ("25%", "last-token", "mrs", "sim"),
    ("50%", "gate-lookahead", "shallow", "cpu"),
    ("50%", "eam", "lru", "sim"),
]


def test_the_combinations_cover_every_policy_and_untrained_predictor() -> None:
    assert {c[2] for c in COMBOS} == set(POLICIES)
    assert {c[1] for c in COMBOS} == {"none", "last-token", "gate-lookahead", "eam"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_predictor_and_policy_gives_the_full_budget_tokens(family: str, hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    path: Path = hf_checkpoints.path(family)

    async def tokens(device: str = "cpu", **options: object) -> tuple[list[int], int]:
        async with Engine.open(path, device=device, **options) as eng:
            out = (await eng.generate(PROMPT, 8, stop_at_eos=False)).tokens
            assert eng.stats()["pinned_blocks"] == 0
            return out, eng.plan.min_budget_bytes

    async def sweep() -> None:
        want, smallest = await tokens(expert_budget="100%", prefetch="none")
        for budget, predictor, policy, device in COMBOS:
            got, _ = await tokens(device, expert_budget=smallest if budget == MIN else budget, prefetch=predictor,
                                  policy=policy)
            assert got == want, (family, budget, predictor, policy, device)

    asyncio.run(sweep())

"""Token regrouping: which waiting sequences step together, with bounded waiting."""

from __future__ import annotations

import asyncio
import random

import pytest

from moeflow import Engine
from moeflow.scheduling.regroup import Candidate, regroup
from tests.conftest import HFCheckpoints


def _bits(*experts: int) -> int:
    return sum(1 << e for e in set(experts))


def test_the_step_takes_the_sequences_that_share_experts_with_the_resident_and_each_other() -> None:
    cands = [Candidate(0, _bits(0, 1)), Candidate(0, _bits(6, 7)), Candidate(0, _bits(2, 3)),
             Candidate(0, _bits(6, 8)), Candidate(0, _bits(0, 9))]
    # experts 6 and 7 are resident: sequence 1 adds nothing, then 3 adds one (8)
    assert regroup(cands, 2, _bits(6, 7), max_wait=4) == [1, 3]
    # nothing resident: the first pick is the oldest of the cheapest (ties to the older, then arrival)
    assert regroup(cands, 2, 0, max_wait=4) == [0, 4]
    # everyone fits: all of them, in arrival order
    assert regroup(cands, 5, 0, max_wait=4) == [0, 1, 2, 3, 4]


def test_a_sequence_that_waited_max_wait_steps_goes_first_whatever_its_experts() -> None:
    cands = [Candidate(1, _bits(6, 7)), Candidate(5, _bits(2, 3)), Candidate(4, _bits(9, 10)), Candidate(0, _bits(6, 7))]
    assert regroup(cands, 2, _bits(6, 7), max_wait=4) == [1, 2]  # both overdue, oldest first
    assert regroup(cands, 1, _bits(6, 7), max_wait=4) == [1]


def test_no_sequence_waits_more_than_max_wait_steps_in_a_long_run() -> None:
    rng = random.Random(0)
    routes = [_bits(*rng.sample(range(64), 8)) for _ in range(40)]
    ages = [0] * len(routes)
    worst = 0
    for _ in range(300):
        picked = set(regroup([Candidate(a, r) for a, r in zip(ages, routes, strict=True)], 8, _bits(*range(8)), 4))
        for i in range(len(ages)):
            ages[i] = 0 if i in picked else ages[i] + 1
            worst = max(worst, ages[i])
        routes = [_bits(*rng.sample(range(64), 8)) if i in picked else r for i, r in enumerate(routes)]
    # 40 sequences, 8 a step: 5 steps per round; a sequence is due after 4 waits, and at most
    # 8 are due at once, so nobody waits longer than max_wait + the rounds it takes to drain
    assert worst <= 4 + 40 // 8, worst


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_regrouped_and_fifo_steps_give_every_request_its_solo_tokens(
    hf_checkpoints: HFCheckpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 requests, 6 a step: whichever sequences step together, each request gets its solo
    tokens; regrouping did choose (more decode tokens waited than a step took)."""
    import moeflow.runtime.stepper as stepper

    choices: list[tuple[int, int]] = []

    def spy(candidates: list[Candidate], take: int, resident: int, max_wait: int) -> list[int]:
        choices.append((len(candidates), take))
        return regroup(candidates, take, resident, max_wait)

    monkeypatch.setattr(stepper, "regroup", spy)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randrange(2, 12))] for _ in range(24)]
    path = hf_checkpoints.path("olmoe")
    results = {}
    for order in ("fifo", "regroup"):
        async with Engine.open(path, device="cpu", expert_budget="25%", max_batch_sequences=6,
                               batch_order=order) as eng:
            if order == "fifo":
                solo = [(await eng.generate(p, 10, stop_at_eos=False)).tokens for p in prompts]
            got = await asyncio.gather(*(eng.generate(p, 10, stop_at_eos=False) for p in prompts))
            results[order] = [r.tokens for r in got]
            assert eng.stats()["pinned_blocks"] == 0
    assert results["fifo"] == solo and results["regroup"] == solo
    assert sum(1 for n, take in choices if n > take) >= 10, choices

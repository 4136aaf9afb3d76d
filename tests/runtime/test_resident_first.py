"""Resident-first steps: a regrouped step's sequences whose experts are resident go ahead while the others' misses load."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.runtime.runner import ModelRunner, Part, Sequence
from moeflow.runtime.stepper import StepBatcher
from moeflow.scheduling.regroup import resident_first, route_keys
from tests.conftest import HFCheckpoints


def test_resident_first_takes_known_paths_inside_the_resident_experts() -> None:
    resident = 0b1011_0110
    routes = [0b0000_0110, 0, 0b1000_0010, 0b0100_0010, 0b1011_0110, 0b1_0000_0000]
    # 0 is an unknown path (a prompt): it never goes ahead; 3 needs bit 6, 5 needs bit 8
    assert resident_first(routes, resident) == [0, 2, 4]
    assert resident_first(routes, 0) == []


def test_route_keys_are_the_bits_layer_by_layer_nearest_first() -> None:
    experts = 6
    bits = (1 << (1 * experts + 5)) | (1 << 0) | (1 << (3 * experts + 2)) | (1 << 4)
    assert route_keys(bits, experts) == [(0, 0), (0, 4), (1, 5), (3, 2)]
    assert route_keys(0, experts) == []


async def _run(batcher: StepBatcher, runner: ModelRunner, prompt: list[int], n: int,
               solo: bool) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits [1, V]: alone through runner.forward, or batched
    (no sampler: the logits come back and the token is their argmax)."""
    seq = runner.new_sequence(prompt)
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    try:
        ids = prompt
        for _ in range(n):
            if solo:
                logits = await runner.forward(seq, ids)
            else:
                outcome = await batcher.run(seq, ids)
                assert outcome.logits is not None
                logits = outcome.logits
            rows.append(logits[-1:].cpu())
            tokens.append(int(logits[-1].argmax()))
            ids = [tokens[-1]]
    finally:
        if solo:
            seq.finish()
        else:
            await batcher.finish(seq)
    return tokens, rows


async def _split_run(eng: Engine, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """On the engine thread: every prompt alone, then all at once through a regrouping batcher
    of 4 sequences a step; what each step ran, and what the splits sent ahead and kept behind."""
    session = eng.session
    runner = session.runner
    batcher = StepBatcher(runner, asyncio.Lock(), max_tokens=64, max_sequences=4, max_wait=4,
                          snapshot=session.counters_snapshot, end_step=session.end_step,
                          resident=lambda: runner.route_bits(session.cache.resident()))
    stepped: list[set[int]] = []
    # (the step after the one sent ahead, the sequences kept behind, the loads the split started)
    splits: list[tuple[int, set[int], int]] = []
    forward_parts, split = runner.forward_parts, batcher._split

    async def spy_forward(parts: list[Part]) -> list[torch.Tensor | None]:
        stepped.append({id(p.seq) for p in parts})
        return await forward_parts(parts)

    def spy_split(batch: list[Any]) -> list[Any]:
        loads = batcher.early_loads
        ahead = split(batch)
        if len(ahead) < len(batch):
            behind = {id(e.seq) for e, _, _ in batch} - {id(e.seq) for e, _, _ in ahead}
            splits.append((len(stepped) + 1, behind, batcher.early_loads - loads))
        return ahead

    runner.forward_parts = spy_forward  # type: ignore[method-assign]
    batcher._split = spy_split  # type: ignore[method-assign]
    try:
        solo = [await _run(batcher, runner, p, n, solo=True) for p in prompts]
        together = await asyncio.gather(*(_run(batcher, runner, p, n, solo=False) for p in prompts))
    finally:
        del runner.forward_parts
    return dict(solo=solo, together=together, stepped=stepped, splits=splits, early_loads=batcher.early_loads,
                split_steps=batcher.split_steps, sent_ahead=batcher.sent_ahead, waiting=batcher.waiting,
                pinned=session.cache.pinned_blocks())


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 90) for _ in range(rng.randrange(2, 10))] for _ in range(12)]


def _check(got: dict[str, Any]) -> None:
    for (want_tokens, want_rows), (tokens, rows) in zip(got["solo"], got["together"], strict=True):
        assert tokens == want_tokens
        assert max(float((a - b).abs().max()) for a, b in zip(rows, want_rows, strict=True)) <= 1e-4
    # the resident-first steps happened, and the step after each ran exactly the ones kept behind
    assert got["split_steps"] >= 3 and got["sent_ahead"] >= got["split_steps"], got["splits"]
    assert len(got["splits"]) == got["split_steps"]
    for after, behind, loads in got["splits"]:
        assert got["stepped"][after] == behind
        assert loads > 0  # some misses of those kept behind loaded while the others ran (else no split)
    assert got["waiting"] == 0 and got["pinned"] == 0


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_resident_first_steps_on_the_cpu_give_each_request_its_solo_tokens_and_logits(
    hf_checkpoints: HFCheckpoints,
) -> None:
    path = hf_checkpoints.path("olmoe")
    async with Engine.open(path, device="cpu", expert_budget="75%", prefetch="none", dtype="float32") as eng:
        got = await eng.call(lambda: _split_run(eng, _prompts(11), 12))
    _check(got)


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_resident_first_steps_on_the_simulated_gpu_with_a_slow_link_are_exact_and_hazard_free(
    hf_checkpoints: HFCheckpoints,
) -> None:
    """The misses' copies are still in flight on a slow link while the resident group computes:
    compute waits for each copy it reads (the hazard checker would see a read before the copy)."""
    path = hf_checkpoints.path("olmoe")
    async with Engine.open(path, device="sim", expert_budget="75%", prefetch="none", dtype="float32",
                           sim_bandwidth_gbps=0.05, sim_latency_us=200.0) as eng:
        got = await eng.call(lambda: _split_run(eng, _prompts(12), 10))
        assert eng.session.compute.sim.hazards == 0  # type: ignore[attr-defined]
    _check(got)


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_engine_regroup_with_resident_first_equals_solo_greedy_and_counts_its_splits(
    hf_checkpoints: HFCheckpoints,
) -> None:
    """Through the Engine (batch_order='regroup', 4 sequences a step), with a few requests
    cancelled midway: every other request gets its solo greedy tokens, nothing stays pinned or queued."""
    prompts = _prompts(13)
    path = hf_checkpoints.path("olmoe")
    async with Engine.open(path, device="cpu", expert_budget="75%", prefetch="none", max_batch_sequences=4,
                           batch_order="regroup") as eng:
        solo = [(await eng.generate(p, 12, stop_at_eos=False)).tokens for p in prompts]
        tasks = [asyncio.create_task(eng.generate(p, 12, stop_at_eos=False)) for p in prompts]
        doomed = [asyncio.create_task(eng.generate(p, 60, stop_at_eos=False)) for p in prompts[:3]]
        await asyncio.sleep(0.1)
        for task in doomed:  # cancelled midway, perhaps while kept behind: the others are unaffected
            task.cancel()
        got = await asyncio.gather(*tasks)
        await asyncio.gather(*doomed, return_exceptions=True)
        assert all(task.cancelled() for task in doomed)
        batcher = eng._batcher
        assert batcher is not None
        counts = (batcher.steps, batcher.split_steps, batcher.sent_ahead, batcher.early_loads)
        assert batcher.split_steps > 0 and batcher.sent_ahead > 0, counts
        stats = eng.stats()  # the counters reach the engine's stats
        assert (stats["batch_steps"], stats["split_steps"], stats["sent_ahead"], stats["early_loads"]) == counts
        assert eng.stats()["pinned_blocks"] == 0 and batcher.waiting == 0 and batcher.kv_reserved == 0
    assert [r.tokens for r in got] == solo, counts

"""A batched pass over several sequences gives each the logits and greedy tokens of its solo run."""

from __future__ import annotations

import pytest
import torch

from moeflow import Engine
from moeflow.runtime.runner import ModelRunner, Part
from tests.conftest import HFCheckpoints
from tests.hf_models import FAMILIES

PROMPTS = [[5, 17, 42, 3, 77], [9, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9], [60, 31, 8, 12]]
STEPS = 6


async def _solo(runner: ModelRunner, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    seq = runner.new_sequence(prompt)
    tokens, rows = [], []
    try:
        ids = prompt
        for _ in range(STEPS):
            logits = (await runner.forward(seq, ids))[-1]
            rows.append(logits.clone())
            tokens.append(int(logits.argmax()))
            ids = [tokens[-1]]
    finally:
        seq.finish()
    return tokens, rows


async def _batched(runner: ModelRunner, prompts: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Sequences join at different steps (the i-th at step i), as continuous batching admits them."""
    seqs = [runner.new_sequence(p) for p in prompts]
    out: list[tuple[list[int], list[torch.Tensor]]] = [([], []) for _ in prompts]
    try:
        step = 0
        while any(len(t) < STEPS for t, _ in out):
            active = [i for i in range(len(prompts)) if i <= step and len(out[i][0]) < STEPS]
            parts = [Part(seqs[i], prompts[i] if not out[i][0] else [out[i][0][-1]]) for i in active]
            for i, logits in zip(active, await runner.forward_parts(parts), strict=True):
                assert logits is not None
                out[i][1].append(logits[-1].clone())
                out[i][0].append(int(logits[-1].argmax()))
            step += 1
    finally:
        for seq in seqs:
            seq.finish()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_batched_pass_equals_solo_runs_at_the_smallest_budget(hf_checkpoints: HFCheckpoints, family: str) -> None:
    path = hf_checkpoints.path(family)
    async with Engine.open(path, device="cpu") as eng:
        smallest = eng.plan.block_bytes * eng.plan.top_k
    async with Engine.open(path, device="cpu", expert_budget=smallest, prefetch="gate-lookahead") as eng:
        runner = eng.session.runner  # the runner belongs to the engine thread: run there

        async def both() -> tuple[list[tuple[list[int], list[torch.Tensor]]], list[tuple[list[int], list[torch.Tensor]]]]:
            return [await _solo(runner, p) for p in PROMPTS], await _batched(runner, PROMPTS)

        solo, batched = await eng.call(both)
        assert eng.stats()["pinned_blocks"] == 0
    for i, ((want_tokens, want_rows), (tokens, rows)) in enumerate(zip(solo, batched, strict=True)):
        assert tokens == want_tokens, f"{family}: sequence {i}"
        for step, (want, got) in enumerate(zip(want_rows, rows, strict=True)):
            rel = float((got - want).abs().max() / want.abs().max())
            assert rel < 1e-4, f"{family}: sequence {i} step {step}: logits differ by {rel:.1e}"


@pytest.mark.asyncio
async def test_one_sequence_twice_in_a_pass_is_refused(hf_checkpoints: HFCheckpoints) -> None:
    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu") as eng:
        seq = eng.session.runner.new_sequence([1, 2])
        try:
            with pytest.raises(ValueError, match="one part per sequence"):
                await eng.call(eng.session.runner.forward_parts, [Part(seq, [1]), Part(seq, [2])])
        finally:
            seq.finish()

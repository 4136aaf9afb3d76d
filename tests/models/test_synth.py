"""`moeflow synth` writes real Hub checkpoints: transformers loads each family and agrees with moeflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.models.synth import ARCHITECTURES, synthesize
from tests.hf_models import load_hf


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
@pytest.mark.asyncio
async def test_synthesized_checkpoint_loads_in_transformers_and_matches(family: str, tmp_path: Path) -> None:
    path = tmp_path / family
    synthesize(path, family, "tiny", seed=1, progress=False)
    assert (path / "tokenizer.json").is_file()
    ids = [1, 40, 41, 300, 7]
    hf = load_hf(path)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
        got = await eng.logits(ids)
        assert eng.encode("def f(x):") and eng.decode(eng.encode("def f(x):")) == "def f(x):"
    assert (got - want).abs().max() / want.abs().max() < 1e-4


@pytest.mark.asyncio
async def test_mla_attention_biases_are_written_and_read(tmp_path: Path) -> None:
    path = tmp_path / "v3-bias"
    synthesize(path, "deepseek_v3", "tiny", seed=2, progress=False, attention_bias=True)
    hf = load_hf(path)
    ids = [1, 40, 41, 300, 7]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    async with Engine.open(path, device="cpu") as eng:
        got = await eng.logits(ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-4

"""The GPU configuration gives the CPU's logits: device tier, pinned home, three tiers, prefetch, kernels.

The main model has 17 MB experts (hidden 1024, intermediate 2816, bf16) and the transfers run with
io_chunk = 4 MiB, so every expert crosses several parts: a copy that stops at one part (the bug of
issue 9) leaves stale weights and moves the logits. Logits are compared, not tokens: on random
weights the experts barely move the argmax. Each configuration runs twice: prefill (many tokens per
expert) and stepwise (one token per step, the decode path).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.config import DEVICES

PROMPT = [5, 17, 42, 3, 77, 12, 301, 9, 250, 64, 33, 128]
IO_CHUNK = 4 << 20
BIG_MIXTRAL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                   num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=512)
BF16_TOLERANCE = 2e-2  # max |diff| / max |logit|: bf16 kernels of two devices, two layers deep

# 'sim' (the simulated GPU of the Rust core) runs the same orchestration on the CPU, in CI.
_SIM = pytest.param("sim", marks=[pytest.mark.slow, pytest.mark.skipif("sim" not in DEVICES,
                                                                         reason="device='sim' not available")])
_CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
ACCELERATED = [_CUDA, _SIM]


@dataclass
class Outcome:
    prefill: torch.Tensor  # [len, vocab] float32
    stepwise: torch.Tensor  # [len, vocab], one token per step
    stats: dict[str, Any]


def _open(path: Path, **options: Any) -> Outcome:
    async def go() -> Outcome:
        async with Engine.open(path, io_chunk=IO_CHUNK, **options) as eng:
            prompt = [t % eng.session.arch.vocab_size for t in PROMPT]  # the tiny families' vocabulary is 96
            prefill = await eng.logits(prompt)
            stepwise = await eng.score(prompt, stepwise=True)
            stats = eng.stats().as_dict()
            assert stats["pinned_blocks"] == 0
            return Outcome(prefill, stepwise, stats)

    return asyncio.run(go())


def _assert_close(got: torch.Tensor, want: torch.Tensor, device: str, tolerance: float, what: str) -> None:
    assert got.shape == want.shape and torch.isfinite(got).all(), what
    if device == "sim":  # the same torch ops on the same CPU: bit for bit
        assert torch.equal(got, want), f"{what}: max |diff| {(got - want).abs().max().item():.3g}"
        return
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tolerance, f"{what}: max |diff| / max |logit| = {err:.4f} > {tolerance}"


def _assert_whole_copies(stats: dict[str, Any], exact_count: bool) -> None:
    """Every load moved a whole expert blob (a copy cut at io_chunk moves a multiple of 4 MiB)."""
    block = stats["block_bytes"]
    assert block > 2 * IO_CHUNK  # at least three parts
    assert stats["bytes_loaded"] > 0 and stats["bytes_loaded"] % block == 0, (stats["bytes_loaded"], block)
    if exact_count:  # nothing speculative may still be in flight
        assert stats["bytes_loaded"] == stats["loads"] * block


@pytest.fixture(scope="module")
def big_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeflow.models.synth import synthesize

    path = tmp_path_factory.mktemp("big") / "mixtral"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the random weights are drawn (speed only)
    synthesize(path, "mixtral", "small", dtype=torch.bfloat16, progress=False, device=device, **BIG_MIXTRAL)
    return path


@pytest.fixture(scope="module")
def cpu_reference(big_mixtral: Path) -> Outcome:
    return _open(big_mixtral, device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("device", ACCELERATED)
@pytest.mark.parametrize("prefetch", ["none", "gate-lookahead"])
@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_logits_match_the_cpu_with_experts_larger_than_io_chunk(big_mixtral: Path, cpu_reference: Outcome,
                                                                 device: str, prefetch: str, budget: str) -> None:
    got = _open(big_mixtral, device=device, dtype="bfloat16", expert_budget=budget, prefetch=prefetch)
    assert got.stats["device"] == device
    _assert_close(got.prefill, cpu_reference.prefill, device, BF16_TOLERANCE, "prefill")
    _assert_close(got.stepwise, cpu_reference.stepwise, device, BF16_TOLERANCE, "stepwise")
    if budget == "25%":
        assert got.stats["misses"] > 0
    _assert_whole_copies(got.stats, exact_count=prefetch == "none")


@pytest.mark.parametrize("device", ACCELERATED)
def test_three_tiers_give_the_cpu_logits(big_mixtral: Path, cpu_reference: Outcome, device: str) -> None:
    """Device 25%, pinned host 50% over the disk: experts come up two tiers on a miss."""
    got = _open(big_mixtral, device=device, dtype="bfloat16", expert_budget="25%", host_budget="50%",
                prefetch="gate-lookahead")
    _assert_close(got.prefill, cpu_reference.prefill, device, BF16_TOLERANCE, "prefill")
    _assert_close(got.stepwise, cpu_reference.stepwise, device, BF16_TOLERANCE, "stepwise")
    assert got.stats["misses"] > 0
    _assert_whole_copies(got.stats, exact_count=False)


@pytest.mark.parametrize("device", ACCELERATED)
def test_quantized_experts_match_the_cpu_reference(big_mixtral: Path, device: str) -> None:
    """int8 experts (8.7 MB blobs): the CUDA kernels (grouped for prefill, fused for decode)
    against the torch reference the CPU runs, on the same codes."""
    want = _open(big_mixtral, device="cpu", dtype="bfloat16", precision="int8")
    got = _open(big_mixtral, device=device, dtype="bfloat16", precision="int8", expert_budget="25%")
    _assert_close(got.prefill, want.prefill, device, 5e-2, "prefill")
    _assert_close(got.stepwise, want.stepwise, device, 5e-2, "stepwise")
    _assert_whole_copies(got.stats, exact_count=False)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "olmoe"])
def test_every_family_runs_on_the_gpu_with_the_cpu_logits(hf_checkpoints: Any, family: str) -> None:
    """Family code on the device (MLA, shared experts, group-limited routing); sizes are the
    big model's business above."""
    path = hf_checkpoints.path(family)
    want = _open(path, device="cpu")
    for budget in ("30%", "100%"):
        got = _open(path, device="cuda", expert_budget=budget)
        _assert_close(got.prefill, want.prefill, "cuda", 1e-3, f"{family} {budget} prefill")
        _assert_close(got.stepwise, want.stepwise, "cuda", 1e-3, f"{family} {budget} stepwise")

"""The GPU orchestration on the simulated GPU (device="sim"): every family and budget gives the
CPU engine's logits bit for bit, every copy moves whole experts, and the hazard checker stays
silent, and fires when the engine's orderings are taken away."""

from __future__ import annotations

import pytest
import torch

from moeflow import Engine
from moeflow.errors import HazardError
from moeflow.memory.device import SimDevice
from tests.hf_models import FAMILIES

PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]
DECODE = [11, 4, 90, 23, 7, 66]
# 4 KiB parts: every expert of the tiny models (12-40 KiB) crosses several parts of a copy
CHUNK = 4096


async def _budgets(path) -> dict[str, int]:  # type: ignore[no-untyped-def]
    async with Engine.open(path, device="cpu") as eng:
        block, top_k, total = eng.plan.block_bytes, eng.plan.top_k, eng.plan.total_expert_bytes
    smallest = block * top_k
    return {"smallest": smallest, "middle": (smallest + total) // 2, "full": total}


async def _run(path, device: str, budget: int, **options) -> tuple[torch.Tensor, torch.Tensor, dict]:  # type: ignore[no-untyped-def]
    async with Engine.open(path, device=device, expert_budget=budget, io_chunk=CHUNK, **options) as eng:
        prefill = await eng.logits(PROMPT)
        stepwise = await eng.score(PROMPT + DECODE, stepwise=True)
        stats = eng.stats().as_dict()
        if device == "sim":
            sim = eng.session.compute
            assert isinstance(sim, SimDevice)
            stats["hazards"] = sim.sim.hazards
            stats["blob"] = eng.plan.block_bytes
    return prefill, stepwise, stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.asyncio
async def test_every_family_on_the_simulated_gpu_gives_the_cpu_logits_bit_for_bit(hf_checkpoints, family):  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path(family)
    for name, budget in (await _budgets(path)).items():
        cpu_prefill, cpu_steps, _ = await _run(path, "cpu", budget)
        sim_prefill, sim_steps, stats = await _run(path, "sim", budget, prefetch="gate-lookahead")
        assert torch.equal(sim_prefill, cpu_prefill), f"{family} at {name}: prefill logits differ"
        assert torch.equal(sim_steps, cpu_steps), f"{family} at {name}: decode logits differ"
        assert stats["hazards"] == 0
        assert stats["pinned_blocks"] == 0
        # whole experts landed: every load moved exactly one blob
        assert stats["bytes_loaded"] == stats["loads"] * stats["blob"], f"{family} at {name}"
        if name == "smallest":
            assert stats["misses"] > 0 and stats["evictions"] > 0


@pytest.mark.asyncio
async def test_three_tiers_on_the_simulated_gpu_give_the_cpu_logits(hf_checkpoints):  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("mixtral")
    budget = (await _budgets(path))["smallest"]
    cpu_prefill, cpu_steps, _ = await _run(path, "cpu", budget)
    sim_prefill, sim_steps, stats = await _run(path, "sim", budget, host_budget="50%")
    assert torch.equal(sim_prefill, cpu_prefill) and torch.equal(sim_steps, cpu_steps)
    assert stats["hazards"] == 0 and stats["bytes_loaded"] == stats["loads"] * stats["blob"]


@pytest.mark.asyncio
async def test_experts_larger_than_the_default_io_chunk_land_whole(tmp_path):  # type: ignore[no-untyped-def]
    """6 MiB experts against the default 4 MiB io_chunk: the bug that copied only the first
    4 MiB of each expert reads poison (never-written bytes) here."""
    from tests.hf_models import save_tiny

    path = save_tiny("mixtral", tmp_path / "wide", hidden_size=256, intermediate_size=2048, num_hidden_layers=1,
                     num_local_experts=4, num_attention_heads=4, num_key_value_heads=2)
    async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
        ref = await eng.logits(PROMPT)
    async with Engine.open(path, device="sim", expert_budget="50%", sim_bandwidth_gbps=100.0) as eng:
        assert eng.plan.block_bytes > 4 << 20
        got = await eng.logits(PROMPT)
        stats = eng.stats()
        assert stats["bytes_loaded"] == stats["loads"] * eng.plan.block_bytes
        assert eng.session.compute.sim.hazards == 0  # type: ignore[attr-defined]
    assert torch.equal(got, ref)


@pytest.mark.asyncio
async def test_the_checker_fires_when_compute_does_not_wait_for_the_copy(hf_checkpoints, monkeypatch):  # type: ignore[no-untyped-def]
    """Take away the compute stream's wait on an issued copy: compute reads an expert whose
    bytes have not landed, and the simulated device says so."""
    path = hf_checkpoints.path("mixtral")
    budget = (await _budgets(path))["smallest"]
    monkeypatch.setattr(SimDevice, "wait", lambda self, event: None)
    with pytest.raises(HazardError) as caught:
        # slow copies (about 10 ms each) so that no load can land before compute reads it
        async with Engine.open(path, device="sim", expert_budget=budget, sim_bandwidth_gbps=0.01,
                               sim_latency_us=5000.0, prefetch="none") as eng:
            await eng.logits(PROMPT)
    assert caught.value.kind == "read-before-copy"


@pytest.mark.asyncio
async def test_the_checker_fires_when_a_copy_reuses_a_block_without_its_fence(hf_checkpoints, monkeypatch):  # type: ignore[no-untyped-def]
    """Take away the fence recorded when a layer releases its experts: a copy reuses the block
    of an expert that compute queued earlier still reads, and the simulated device says so."""
    path = hf_checkpoints.path("mixtral")
    budget = (await _budgets(path))["smallest"]
    monkeypatch.setattr(SimDevice, "fence", lambda self: None)
    with pytest.raises(HazardError) as caught:
        async with Engine.open(path, device="sim", expert_budget=budget, prefetch="none") as eng:
            await eng.logits(PROMPT)  # a prefill layer runs more experts than the budget holds
    assert caught.value.kind == "copy-over-read"


@pytest.mark.asyncio
async def test_a_host_budget_below_one_layers_top_k_is_refused_naming_host_budget(hf_checkpoints):  # type: ignore[no-untyped-def]
    from moeflow.errors import ConfigError

    path = hf_checkpoints.path("mixtral")
    with pytest.raises(ConfigError, match=r"^host_budget=4\.0 KiB .* below the minimum"):
        async with Engine.open(path, device="sim", host_budget=4096):
            pass

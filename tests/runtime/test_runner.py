"""The decode step's device reads: one per MoE layer (router choice and predictor guess together),
none per dense layer, one for the token; counted by the one function that reads back."""

from __future__ import annotations

import pytest

from moeflow import Engine
from moeflow.memory.device import ComputeDevice


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])  # deepseek_v2 has a dense first layer
@pytest.mark.parametrize("prefetch", ["none", "gate-lookahead", "last-token"])
@pytest.mark.asyncio
async def test_a_decode_step_reads_the_device_once_per_moe_layer(hf_checkpoints, family, prefetch, monkeypatch):  # type: ignore[no-untyped-def]
    reads: list[int] = []
    original = ComputeDevice.readback

    def counting(self, *tensors):  # type: ignore[no-untyped-def]
        reads.append(len(tensors))
        return original(self, *tensors)

    monkeypatch.setattr(ComputeDevice, "readback", counting)
    async with Engine.open(hf_checkpoints.path(family), device="cpu", expert_budget="50%", prefetch=prefetch) as eng:
        res = await eng.generate([5, 17, 42, 3], 6, stop_at_eos=False)
        moe_layers = len(eng.session.arch.moe_layers)
        assert eng.session.arch.num_layers > moe_layers or family == "mixtral"
        assert res.stats["host_syncs_per_token"] == moe_layers + 1
        assert eng.stats()["host_syncs"] == len(reads) == 6 * (moe_layers + 1)

"""The GPU path's quantized-expert kernels inside the engine, run on the CPU emulator (tests/emu):
an int4 Mixtral at three budgets, every decode step's resident experts in one kernels/moe_decode.cu
launch or one by one as they arrive, prefill through kernels/grouped_mma.cu. The logits are the
same bits at every budget, so the one-launch path equals the per-expert one exactly; and they are
those of the CPU's own int4 path up to the kernels' float rounding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.runtime import gpu_decode, moe
from tests import emu
from tests.hf_models import save_tiny

pytestmark = pytest.mark.skipif(emu.unavailable() is not None, reason=str(emu.unavailable()))

PROMPT = [(7 * i + 3) % 90 + 1 for i in range(40)]  # 40 tokens: some experts get more than 16 rows


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # sizes the tensor-core and decode kernels take: multiples of 64 (K step) and 32 (int4 chunk)
    return save_tiny("mixtral", tmp_path_factory.mktemp("emu") / "mixtral", hidden_size=128,
                     intermediate_size=128, num_local_experts=4, num_attention_heads=4, num_key_value_heads=2)


async def _run(path: Path, budget: object) -> tuple[torch.Tensor, list[int]]:
    if budget == "smallest":  # the top-k of one layer
        async with Engine.open(path, device="cpu", dtype="bfloat16", precision="int4-g64") as eng:
            budget = eng.plan.min_budget_bytes
    async with Engine.open(path, device="cpu", dtype="bfloat16", precision="int4-g64", expert_budget=budget) as eng:
        logits = await eng.logits(PROMPT)
        tokens = (await eng.generate(PROMPT[:6], 8)).tokens
    return logits, tokens


def test_the_gpu_kernels_give_the_same_bits_at_every_budget(int4_model: Path, kernel_device: torch.device,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("runs the GPU kernels on the CPU emulator; on a GPU, tests/api/test_gpu_engine.py")
    cpu_logits, cpu_tokens = asyncio.run(_run(int4_model, None))  # the CPU's own int4 path
    monkeypatch.setattr(moe, "gpu_kernels", lambda x: True)
    launches: list[int] = []
    real = gpu_decode.expert_rows

    def counted(x, offsets, experts, bits, group, row_weight=None):  # type: ignore[no-untyped-def]
        launches.append(len(experts))
        return real(x, offsets, experts, bits, group, row_weight)

    monkeypatch.setattr(gpu_decode, "expert_rows", counted)
    results = {budget: asyncio.run(_run(int4_model, budget)) for budget in (None, 0.5, "smallest")}
    assert max(launches) > 1 and min(launches) == 1  # the one-launch layer path and the per-expert one both ran
    full_logits, full_tokens = results[None]
    for budget, (logits, tokens) in results.items():
        assert torch.equal(logits, full_logits), budget
        assert tokens == full_tokens, budget
    assert (full_logits.float() - cpu_logits.float()).abs().max() <= 3e-2 * cpu_logits.float().abs().max()

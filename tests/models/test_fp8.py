"""FP8 block-quantized checkpoints as DeepSeek-V3, Qwen3-FP8 and MiniMax-M2 publish them, against
transformers' own handling of the same checkpoint (dequantized at load, float32 compute).

transformers' load-time dequantization (Fp8Dequantize._dequantize_one) divides each weight evenly by
its scale grid: a [200, 160] weight with a [2, 2] grid gets 100x80 blocks, where the checkpoint (and
DeepSeek's weight_dequant, vLLM, transformers' own _dequantize_fp8_weight and FP8 matmul kernels)
means 128x128 blocks with partial edge blocks; for DeepSeek-V3's [576, 7168] kv_a_proj_with_mqa
(grid [5, 56]) it raises. Where a size is not a multiple of 128 the reference is therefore transformers
with that one function replaced by transformers' own 128-block _dequantize_fp8_weight; where every
size is a multiple of 128 (or below 128) it is transformers unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.errors import UnsupportedModel
from moeflow.models import Checkpoint
from moeflow.models.synth import parse_arch_from_config, synth_config
from moeflow.store import fp8
from moeflow.store.codecs import codec_for
from tests.hf_models import PROMPT, assert_engine_matches, hf_reference, save_tiny

finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
pytest.importorskip("accelerate")

# hidden 160 and intermediates 200 / 136 cross a 128 block edge: every weight has partial edge blocks
EDGES: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=136),
    "qwen3_moe": dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136),
    "minimax_m2": dict(hidden_size=160, intermediate_size=200),
}
# every size a multiple of 128 (or under it): transformers' load path reads these as they are meant
WHOLE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128)


def _fp8_checkpoint(family: str, out: Path, **sizes: Any) -> Path:
    save_tiny(family, out, **sizes)
    fp8.quantize_checkpoint(out)
    return out


def _hf(path: Path, block_correct: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """transformers' model of the FP8 checkpoint, dequantized at load, float32."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    if block_correct:
        def dequantize_one(self: Any, quantized: torch.Tensor, scales: torch.Tensor,
                           output_dtype: torch.dtype | None = None) -> torch.Tensor:
            return finegrained._dequantize_fp8_weight(quantized, scales, [128, 128], output_dtype or torch.float32)

        monkeypatch.setattr(finegrained.Fp8Dequantize, "_dequantize_one", dequantize_one)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()


async def _budgets(path: Path) -> tuple[int, int, int]:
    async with Engine.open(path, device="cpu") as eng:
        smallest, total = eng.plan.min_budget_bytes, eng.plan.total_expert_bytes
        assert eng.session.store.precision == fp8.PRECISION  # experts stay FP8 by default
    return smallest, (smallest + total) // 2, total


async def _sim_equals_cpu(path: Path, budgets: tuple[int, ...]) -> None:
    for budget in budgets:
        outs = []
        for device in ("cpu", "sim"):
            async with Engine.open(path, device=device, expert_budget=budget) as eng:
                outs.append((await eng.logits(PROMPT), (await eng.generate(PROMPT, 12)).tokens))
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1], budget


@pytest.mark.parametrize("family", sorted(EDGES))
@pytest.mark.asyncio
async def test_fp8_checkpoint_with_partial_blocks_matches_transformers_at_every_budget(
        family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fp8_checkpoint(family, tmp_path / family, **EDGES[family])
    want, tokens = hf_reference(_hf(path, True, monkeypatch))
    budgets = await _budgets(path)
    await assert_engine_matches(path, want, tokens, budgets)
    await _sim_equals_cpu(path, budgets)


@pytest.mark.asyncio
async def test_fp8_deepseek_v3_in_whole_blocks_matches_unmodified_transformers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fp8_checkpoint("deepseek_v3", tmp_path / "ds", **WHOLE)
    want, tokens = hf_reference(_hf(path, False, monkeypatch))
    budgets = await _budgets(path)
    await assert_engine_matches(path, want, tokens, budgets)
    await _sim_equals_cpu(path, budgets[:1])


def test_transformers_load_path_misreads_partial_edge_blocks(tmp_path: Path) -> None:
    """Why the partial-block reference replaces transformers' load-time dequantization: its even
    division of the weight by the grid is not the 128-block layout the checkpoint was written in."""
    w = torch.randn(200, 160, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1.0, 160)
    codes, scale_inv = fp8.quantize(w)
    loaded = finegrained.Fp8Dequantize(None)._dequantize_one(codes, scale_inv, torch.float32)
    assert not torch.equal(loaded, fp8.dequantize(codes, scale_inv))
    assert torch.equal(finegrained._dequantize_fp8_weight(codes, scale_inv, [128, 128], torch.float32),
                       fp8.dequantize(codes, scale_inv))
    assert (fp8.dequantize(codes, scale_inv) - w).abs().max() < (loaded - w).abs().max()


def _pair(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    pair = fp8.read_fp8(ckpt, name)
    assert pair is not None, f"{name} is not FP8"
    return pair


@pytest.mark.asyncio
async def test_store_keeps_the_checkpoint_bytes_and_is_smaller_than_bf16(tmp_path: Path) -> None:
    path = _fp8_checkpoint("deepseek_v3", tmp_path / "ds", **EDGES["deepseek_v3"])
    async with Engine.open(path, device="cpu") as eng:
        store, fp8_logits = eng.session.store, await eng.logits(PROMPT)
        layer = eng.session.arch.moe_layers[0]
        start = store.offset(layer, 3)
        blob = bytearray(store.data_path.read_bytes()[start:start + store.blob_size])
        view = store.manifest.layout.expert_view(torch.frombuffer(blob, dtype=torch.uint8))
    ckpt = Checkpoint(path)
    prefix = f"model.layers.{layer}.mlp.experts.3"
    gate, up, down = (_pair(ckpt, f"{prefix}.{m}_proj.weight") for m in ("gate", "up", "down"))
    assert torch.equal(view["gate_up.q"], torch.cat([gate[0], up[0]]).view(torch.uint8))
    assert torch.equal(view["down.q"], down[0].view(torch.uint8))
    assert torch.equal(view["gate.scale"], gate[1]) and torch.equal(view["up.scale"], up[1])
    assert torch.equal(view["down.scale"], down[1])
    assert view.kind == "fp8"
    h, i = 160, 136
    ratio = fp8.Fp8Codec().layout(h, i).size / codec_for("bfloat16").layout(h, i).size
    assert ratio <= 0.55, ratio
    # DeepSeek-V3's own expert shape: codes are half of bf16's bytes, the scales 1/16384 more
    big = fp8.Fp8Codec().layout(7168, 2048).size / codec_for("bfloat16").layout(7168, 2048).size
    assert 0.5 <= big < 0.501, big
    # another precision dequantizes the FP8 experts first: the same float32 weights, the same logits
    async with Engine.open(path, device="cpu", precision="float32") as eng:
        assert eng.session.store.precision == "float32"
        assert torch.allclose(await eng.logits(PROMPT), fp8_logits, rtol=0, atol=1e-5 * fp8_logits.abs().max().item())


@pytest.mark.asyncio
async def test_synth_writes_fp8_that_transformers_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.cli import main

    out = tmp_path / "synth"
    assert main(["synth", "--arch", "deepseek_v3", "--quant", "fp8", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    ckpt = Checkpoint(out)
    assert ckpt.info("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn
    assert ckpt.info("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv").dtype == torch.float32
    assert ckpt.info("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").dtype == torch.float8_e4m3fn
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert ckpt.scale_inv(kept) is None and ckpt.info(kept).dtype == torch.float32
    want, tokens = hf_reference(_hf(out, False, monkeypatch))  # every size under 128: one block each
    async with Engine.open(out, device="cpu") as eng:
        got = await eng.logits(PROMPT)
        assert (got - want).abs().max() / want.abs().max() < 1e-4
        assert (await eng.generate(PROMPT, 12)).tokens == tokens


def _parse(**quant: Any) -> None:
    cfg = synth_config("deepseek_v3", "tiny", torch.float32, quantization_config=quant)
    parse_arch_from_config(cfg, Path("/nowhere"))


BLOCKS = dict(quant_method="fp8", weight_block_size=[128, 128])


@pytest.mark.parametrize(("quant", "field"), [
    ({**BLOCKS, "fmt": "e5m2"}, "quantization_config.fmt"),
    ({**BLOCKS, "activation_scheme": "static"}, "quantization_config.activation_scheme"),
    ({"quant_method": "fp8"}, "quantization_config.weight_block_size"),  # per-tensor scales
    ({**BLOCKS, "weight_block_size": [128]}, "quantization_config.weight_block_size"),
    ({**BLOCKS, "weight_block_size": [128, "128"]}, "quantization_config.weight_block_size"),
    ({**BLOCKS, "scale_fmt": "e8m0"}, "quantization_config.scale_fmt"),
    ({**BLOCKS, "modules_to_convert": ["embed"]}, "quantization_config.modules_to_convert"),
    ({"quant_method": "gptq", "bits": 4}, "quantization_config"),
])
def test_unhandled_fp8_variants_are_refused_naming_the_field(quant: dict[str, Any], field: str) -> None:
    with pytest.raises(UnsupportedModel) as err:
        _parse(**quant)
    assert err.value.field == field


def test_published_fp8_configs_are_accepted() -> None:
    _parse(**BLOCKS, fmt="e4m3", activation_scheme="dynamic")  # DeepSeek-V3 / R1, Kimi-K2
    _parse(**BLOCKS, activation_scheme="dynamic", modules_to_not_convert=["lm_head"])  # Qwen3-FP8, MiniMax-M2

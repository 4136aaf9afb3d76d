"""GPT-OSS (gpt_oss): that each of its features (attention sinks, the SwiGLU clamps, interleaved
gate/up columns, expert biases) is one the parity sweep actually measures, the config read as
GptOssConfig fills it in, the variants refused, and a synthesized model that opens and generates.
The parity and sim sweeps over tests.hf_models.FAMILIES cover the tiny checkpoint at every budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.errors import ConfigError, UnsupportedModel
from moeflow.models import Checkpoint, parse_arch
from moeflow.models.base import ConfigReader
from moeflow.models.gpt_oss import parse
from moeflow.models.synth import synthesize
from tests.hf_models import copy_with_config, load_hf, save_tiny

PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _no_sinks(hf: Any) -> None:
    for layer in hf.model.layers:
        layer.self_attn.sinks.data.fill_(-1e9)  # exp(-1e9 - max) is 0: as if the sink were absent


def _no_clamp(hf: Any) -> None:
    for layer in hf.model.layers:
        layer.mlp.experts.limit = float("inf")


def _no_biases(hf: Any) -> None:
    for layer in hf.model.layers:
        layer.mlp.experts.gate_up_proj_bias.data.zero_()
        layer.mlp.experts.down_proj_bias.data.zero_()


def _halves(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], None]:
    """gate and up read as the two halves of gate_up instead of its even and odd columns."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    def apply_gate(self: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    return lambda hf: monkeypatch.setattr(GptOssExperts, "_apply_gate", apply_gate)


@pytest.mark.asyncio
async def test_sinks_clamps_interleave_and_biases_each_move_the_logits(hf_checkpoints,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """moeflow matches transformers on the tiny checkpoint; transformers with any one feature
    turned off is more than 1e-4 away from it, so the parity test would catch its omission."""
    path = hf_checkpoints.path("gpt_oss")
    ids = torch.tensor([PROMPT * 2])  # 20 positions: past the sliding window of 4
    async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
        got = await eng.logits(PROMPT * 2)
    with torch.no_grad():
        assert _rel(got, load_hf(path)(ids).logits[0].float()) < 1e-4
    for name, turn_off in (("sinks", _no_sinks), ("clamp", _no_clamp), ("biases", _no_biases),
                           ("interleave", _halves(monkeypatch))):
        hf = load_hf(path)
        turn_off(hf)
        with torch.no_grad():
            moved = _rel(got, hf(ids).logits[0].float())
        assert moved > 1e-4, f"turning off {name} leaves the logits within {moved:.1e}"


def test_config_reads_as_gpt_oss_config_fills_it_in(tmp_path: Path) -> None:
    """A config.json naming only sizes: GptOssConfig's alternating layer types, window 128,
    yarn rope (factor 32 over 4096, base 150000), head_dim 64, biases, alpha 1.702, limit 7."""
    from transformers import GptOssConfig

    fields: dict[str, Any] = dict(model_type="gpt_oss", vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    want = GptOssConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    assert want.layer_types is not None
    arch = parse(ConfigReader(fields, tmp_path))
    windows = tuple(want.sliding_window if t == "sliding_attention" else None for t in want.layer_types)
    assert arch.attention.sliding_window == windows == (128, None, 128, None)
    rope = arch.attention.rope
    assert rope.kind == "yarn" and rope.theta == 150000.0 and rope.dim == want.head_dim == 64
    assert rope.params["factor"] == 32.0 and rope.params["original_max_position_embeddings"] == 4096
    assert rope.params["truncate"] == 0.0
    assert arch.attention.sinks and arch.attention.qkv_bias and arch.attention.o_bias
    assert arch.swiglu == (want.swiglu_alpha, want.swiglu_limit) == (1.702, 7.0)
    assert arch.router.gate_bias and arch.router.norm_topk_prob


def test_mxfp4_checkpoint_loads_with_its_experts_in_mxfp4(tmp_path: Path) -> None:
    """The Hub's layout (blocks and scales, quantization_config mxfp4) parses as the same GPT-OSS;
    tests/models/test_gpt_oss_mxfp4.py runs it against transformers."""
    path = tmp_path / "mxfp4"
    synthesize(path, "gpt_oss", "tiny", progress=False)
    ckpt = Checkpoint(path)
    assert ckpt.config["quantization_config"]["quant_method"] == "mxfp4"
    arch = parse_arch(ckpt)
    assert arch.family == "gpt_oss" and arch.swiglu == (1.702, 7.0)
    with pytest.raises(UnsupportedModel) as err:
        parse_arch(Checkpoint(copy_with_config(path, tmp_path / "gptq", quantization_config={"quant_method": "gptq"})))
    assert err.value.field == "quantization_config.quant_method"


@pytest.mark.asyncio
async def test_quantized_store_precision_is_refused_naming_precision(hf_checkpoints) -> None:
    with pytest.raises(ConfigError, match="precision int8"):
        async with Engine.open(hf_checkpoints.path("gpt_oss"), device="cpu", precision="int8"):
            pass


@pytest.mark.asyncio
async def test_synthesized_tiny_opens_and_generates(tmp_path: Path) -> None:
    synthesize(tmp_path / "tiny", "gpt_oss", "tiny", progress=False)
    async with Engine.open(tmp_path / "tiny", device="cpu", expert_budget="50%") as eng:
        res = await eng.generate(PROMPT, 6)
    assert len(res.tokens) == 6


def test_checkpoint_holds_fused_expert_biases_and_sinks_in_the_table_shapes(hf_checkpoints) -> None:
    """The tiny checkpoint's fused tensors have the shapes the table expects (biases included)."""
    ckpt = Checkpoint(hf_checkpoints.path("gpt_oss"))
    arch = parse_arch(ckpt)
    e, h, i = arch.num_experts, arch.hidden_size, arch.expert_intermediate
    assert ckpt.info("model.layers.0.mlp.experts.gate_up_proj_bias").shape == (e, 2 * i)
    assert ckpt.info("model.layers.0.mlp.experts.down_proj_bias").shape == (e, h)
    assert ckpt.info("model.layers.0.self_attn.sinks").shape == (arch.attention.num_heads,)


@pytest.mark.parametrize("fields, field", [
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ({"sliding_window": None}, "sliding_window"),
])
def test_unhandled_layer_variants_are_refused_naming_the_field(tmp_path: Path, fields: dict[str, Any],
                                                               field: str) -> None:
    config = dict(model_type="gpt_oss", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **fields)
    with pytest.raises(UnsupportedModel) as err:
        parse(ConfigReader(config, tmp_path))
    assert err.value.field == field

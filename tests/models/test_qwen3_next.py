"""Qwen3-Next (qwen3_next) and Qwen3.5-MoE (qwen3_5_moe_text, qwen3_5_moe): that their Gated
DeltaNet layers and output-gated attention are what the parity sweep measures, the config read as
transformers fills it in, the variants refused, the per-sequence linear-attention state counted
against kv_budget, batched per sequence and freed on cancel, the multimodal Hub layout (text decoder
under model.language_model, experts per tensor or fused) against transformers at every budget and
on the simulated GPU, and synthesized models that open and generate. The parity, sim, batching and
chunked-prefill sweeps over tests.hf_models.FAMILIES cover the tiny checkpoints at every budget."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.errors import InvalidRequest, UnsupportedModel
from moeflow.models.base import ConfigReader
from moeflow.models.qwen3_next import parse
from moeflow.models.synth import synthesize
from moeflow.runtime.deltanet import DeltaState, GatedAttention, GatedDeltaNet
from moeflow.runtime.runner import Sequence
from tests.conftest import HFCheckpoints
from tests.hf_models import PROMPT, TINY, load_hf


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
def test_linear_attention_and_the_output_gate_each_move_the_logits(hf_checkpoints: HFCheckpoints, family: str) -> None:
    """Without the DeltaNet layers' output, or with every attention gate at 0.5, transformers'
    own logits move far beyond the parity tolerance: the sweep measures both."""
    hf = load_hf(hf_checkpoints.path(family))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = hf(ids).logits[0]
        for layer in hf.model.layers:
            if layer.block_type == "linear_attention":
                layer.linear_attn.out_proj.weight.zero_()
        assert _rel(hf(ids).logits[0], want) > 1e-2
    hf = load_hf(hf_checkpoints.path(family))
    with torch.no_grad():
        for layer in hf.model.layers:
            if layer.block_type == "full_attention":
                attn = layer.self_attn
                rows = attn.q_proj.weight.view(attn.config.num_attention_heads, 2 * attn.head_dim, -1)
                rows[:, attn.head_dim:] = 0  # gate logits 0: every gate at 0.5 instead of its own value
        assert _rel(hf(ids).logits[0], want) > 1e-3


def test_config_reads_as_qwen3_next_config_fills_it_in(tmp_path: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_next", vocab_size=96, num_hidden_layers=8).to_dict()
    del cfg["layer_types"]  # the Hub config.json: full_attention_interval only (default 4)
    arch = parse(ConfigReader(cfg, tmp_path))
    assert arch.linear_attention is not None
    assert arch.linear_attention.layers == (True, True, True, False) * 2
    assert (arch.linear_attention.num_k_heads, arch.linear_attention.num_v_heads) == (16, 32)
    assert arch.linear_attention.conv_channels == 2 * 16 * 128 + 32 * 128
    assert arch.attention.rope.dim == 64 and arch.attention.output_gate  # 25% of 256 dims rotate
    assert arch.shared is not None and arch.shared.gated and arch.norm == "rms_centered"
    assert arch.moe_layers == tuple(range(8)) and arch.router.norm_topk_prob


def test_qwen3_5_text_config_reads_as_transformers_fills_it_in(tmp_path: Path) -> None:
    """Every layer sparse (the config has no mlp_only_layers), top-k always renormalized, the
    mrope fields of a text-only model ignored (equal positions: plain rope over 25% of a head)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_5_moe_text", vocab_size=96, num_hidden_layers=4).to_dict()
    cfg["rope_parameters"].update(mrope_section=[11, 11, 10], mrope_interleaved=True)
    arch = parse(ConfigReader(cfg, tmp_path))
    assert arch.family == "qwen3_5_moe_text" and arch.moe_layers == (0, 1, 2, 3) and arch.router.norm_topk_prob
    assert arch.linear_attention is not None and arch.linear_attention.layers == (True, True, True, False)
    assert arch.attention.rope.dim == 64 and arch.attention.rope.kind == "default"


@pytest.mark.parametrize(("fields", "field"), [
    ({"attention_bias": True}, "attention_bias"),
    ({"linear_num_key_heads": 3, "linear_num_value_heads": 4}, "linear_num_value_heads"),
    ({"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types"),
    ({"full_attention_interval": 0}, "full_attention_interval"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unhandled_variants_are_refused_naming_the_field(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    config = {"model_type": "qwen3_next", **TINY["qwen3_next"], "num_hidden_layers": 2, **fields}
    with pytest.raises(UnsupportedModel) as err:
        parse(ConfigReader(config, tmp_path))
    assert err.value.field == field


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_state_is_per_sequence_batched_counted_and_freed(hf_checkpoints: HFCheckpoints) -> None:
    """Two concurrent requests (continuous batching: their decode tokens share steps, each layer's
    state its own) give their solo tokens; the state's fixed bytes are part of each admission; a
    cancelled request's states are freed and its admission returned."""
    path = hf_checkpoints.path("qwen3_next")
    prompts = [PROMPT, [9, 8, 7, 60]]
    async with Engine.open(path, device="cpu") as eng:
        runner = eng.session.runner
        kinds = {type(layer.attention) for layer in eng.session.model.layers}
        assert kinds == {GatedDeltaNet, GatedAttention}
        fixed = runner.kv_bytes_per_sequence()
        per_token = runner.kv_bytes_per_token()
        spec = eng.session.arch.linear_attention
        assert spec is not None
        linear = sum(spec.layers)
        assert fixed == linear * 4 * (spec.num_v_heads * spec.k_head_dim * spec.v_head_dim
                                      + spec.conv_channels * (spec.conv_kernel - 1))
        assert eng._batcher is not None and eng._batcher.kv_bytes(10) == 10 * per_token + fixed
        solo = [(await eng.generate(p, 12)).tokens for p in prompts]
        steps = eng.session.steps
        both = await asyncio.gather(*(eng.generate(p, 12) for p in prompts))
        assert [r.tokens for r in both] == solo
        assert eng.session.steps - steps < 24  # the two shared steps

        made: list[Sequence] = []
        new_sequence = runner.new_sequence

        def record(prompt: list[int], **kw: Any) -> Sequence:
            made.append(new_sequence(prompt, **kw))
            return made[-1]

        runner.new_sequence = record  # type: ignore[method-assign]
        task = asyncio.create_task(eng.generate(PROMPT, 200))
        while not made or made[0].length <= len(PROMPT):  # prefilled and decoding
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        states = [c for c in made[0].kv if isinstance(c, DeltaState)]
        assert len(states) == linear and all(s.recurrent is None and s.conv is None for s in states)
        assert eng._batcher.kv_reserved == 0
    # a budget below one sequence's fixed state plus its positions is refused, naming kv_budget
    async with Engine.open(path, device="cpu", kv_budget=fixed + per_token * (len(PROMPT) + 11)) as eng:
        with pytest.raises(InvalidRequest, match="kv_budget"):
            await eng.generate(PROMPT, 12)
        assert len((await eng.generate(PROMPT, 11)).tokens) == 11


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe_text"])
@pytest.mark.asyncio
async def test_synthesized_tiny_opens_and_generates(tmp_path: Path, family: str) -> None:
    synthesize(tmp_path, family, "tiny", progress=False)
    async with Engine.open(tmp_path, device="cpu") as eng:
        assert eng.session.arch.linear_attention is not None
        assert len((await eng.generate([1, 5, 9], 4, stop_at_eos=False)).tokens) == 4


def test_tiny_config_crosses_every_layer_kind() -> None:
    """The sweeps' tiny checkpoint holds linear and full attention, sparse and dense layers."""
    cfg = TINY["qwen3_next"]
    interval, layers = cfg["full_attention_interval"], cfg["num_hidden_layers"]
    kinds = {(i + 1) % interval == 0 for i in range(layers)}
    assert kinds == {True, False} and cfg["mlp_only_layers"]


def _save_multimodal(out: Path) -> Path:
    """Qwen3.5-MoE as published (Qwen3_5MoeForConditionalGeneration): a text_config inside the
    config, the text decoder under model.language_model, a (tiny) vision tower beside it."""
    from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=TINY["qwen3_5_moe_text"],
                                                                 vision_config=vision)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif "gate.weight" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_multimodal_checkpoint_runs_its_text_model_as_transformers_at_every_budget(tmp_path: Path) -> None:
    from tests.hf_models import assert_engine_matches, hf_reference

    path = _save_multimodal(tmp_path / "qwen3_5_moe")
    want, tokens = hf_reference(load_hf(path))  # transformers loads the text model (Qwen3_5MoeForCausalLM)
    async with Engine.open(path, device="cpu") as eng:
        assert eng.session.arch.naming.prefix == "model.language_model"
        total = eng.plan.total_expert_bytes
    await assert_engine_matches(path, want, tokens, ("smallest", total // 2, total))
    for budget in ("smallest", None):
        runs = []
        for device in ("cpu", "sim"):
            async with Engine.open(path, device=device) as eng:
                size = eng.plan.min_budget_bytes if budget == "smallest" else None
            async with Engine.open(path, device=device, expert_budget=size) as eng:
                runs.append((await eng.logits(PROMPT), await eng.score(PROMPT + [11, 4, 90], stepwise=True)))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), budget


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_hub_layout_with_fused_experts_gives_the_per_expert_checkpoints_logits(tmp_path: Path) -> None:
    """The published checkpoints stack each layer's experts (gate_up [E, 2I, H], down [E, H, I]):
    transformers reads them as it reads one tensor per expert, and so does moeflow."""
    from safetensors.torch import load_file, save_file

    from tests.hf_models import assert_engine_matches, hf_reference

    path = _save_multimodal(tmp_path / "per_expert")
    tensors = load_file(str(path / "model.safetensors"))
    cfg = TINY["qwen3_5_moe_text"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.language_model.layers.{layer}.mlp.experts"
        experts = range(cfg["num_experts"])
        gate_up = [torch.cat([tensors.pop(f"{p}.{e}.gate_proj.weight"), tensors.pop(f"{p}.{e}.up_proj.weight")])
                   for e in experts]
        tensors[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{p}.down_proj"] = torch.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in experts])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    want, tokens = hf_reference(load_hf(path))
    async with Engine.open(path, device="cpu") as eng:
        assert eng.session.arch.naming.fused_rows
    await assert_engine_matches(path, want, tokens, ("smallest", None))

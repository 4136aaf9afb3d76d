"""Llama-4 text: what the parity sweeps (tests/hf_models.FAMILIES) do not cover on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.errors import UnsupportedModel
from moeflow.models import Checkpoint, parse_arch
from moeflow.models.synth import synthesize
from moeflow.models.tensors import expert_tensors, read_tensor
from tests.hf_models import load_hf


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **changes}))
    return dst


def test_the_multimodal_llama4_checkpoint_is_refused_naming_model_type(hf_checkpoints, tmp_path: Path) -> None:
    # The Hub's Llama-4 Scout/Maverick: model_type llama4, the text model's fields under text_config
    src = hf_checkpoints.path("llama4_text")
    text = json.loads((src / "config.json").read_text())
    path = _with_config(src, tmp_path / "mm", model_type="llama4", architectures=["Llama4ForConditionalGeneration"],
                        text_config=text)
    with pytest.raises(UnsupportedModel, match="model_type='llama4'.*Llama4ForCausalLM") as err:
        parse_arch(Checkpoint(path))
    assert err.value.field == "model_type"


def test_an_unknown_layer_type_is_refused_naming_layer_types(hf_checkpoints, tmp_path: Path) -> None:
    src = hf_checkpoints.path("llama4_text")
    path = _with_config(src, tmp_path / "sw", layer_types=["sliding_attention"] * 4)
    with pytest.raises(UnsupportedModel, match="layer_types") as err:
        parse_arch(Checkpoint(path))
    assert err.value.field == "layer_types"


def test_a_fused_experts_matrices_are_its_slices_transposed(hf_checkpoints) -> None:
    ckpt = Checkpoint(hf_checkpoints.path("llama4_text"))
    arch = parse_arch(ckpt)
    layer, e, i = arch.moe_layers[-1], arch.num_experts - 1, arch.expert_intermediate
    gate_up = ckpt.get(f"model.layers.{layer}.feed_forward.experts.gate_up_proj")[e]  # [H, 2I]
    down = ckpt.get(f"model.layers.{layer}.feed_forward.experts.down_proj")[e]  # [I, H]
    gate, up, down_t = (read_tensor(ckpt, t) for t in expert_tensors(arch, layer, e).all())
    assert torch.equal(gate, gate_up[:, :i].T) and torch.equal(up, gate_up[:, i:].T) and torch.equal(down_t, down.T)


@pytest.mark.asyncio
async def test_synthesized_tiny_generates_transformers_tokens_across_chunks(tmp_path: Path) -> None:
    # 40 greedy tokens after a 5-token prompt cross the tiny config's 32-position chunk
    path = tmp_path / "llama4"
    arch = synthesize(path, "llama4", "tiny", seed=3, progress=False)
    assert arch.attention.chunked[0] == 32 and arch.attention.rope_layers[3] is False
    ids = [1, 40, 41, 300, 7]
    hf = load_hf(path)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    async with Engine.open(path, device="cpu", expert_budget="25%") as eng:
        got = await eng.generate(ids, 40)
    assert got.tokens == want

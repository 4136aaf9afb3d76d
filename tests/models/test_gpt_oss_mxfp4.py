"""GPT-OSS with MXFP4 experts, as openai/gpt-oss-* ship: against transformers' dequantized path
(Mxfp4Config(dequantize=True), float32) at the smallest, middle and full budgets on cpu and sim;
the experts kept byte for byte in an mxfp4 store (<= 0.27x the bf16 one), dequantized at convert
for a float precision, `synth` writing the Hub layout, and the variants refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moeflow import Engine
from moeflow.errors import UnsupportedModel
from moeflow.models import Checkpoint, parse_arch
from moeflow.models import mxfp4 as hub
from moeflow.models.synth import synthesize
from moeflow.store import mxfp4
from tests.hf_models import PROMPT, assert_engine_matches, copy_with_config, hf_reference, save_tiny

DECODE = [11, 4, 90, 23, 7, 66]


def to_mxfp4(src: Path, dst: Path) -> Path:
    """A float GPT-OSS checkpoint saved by transformers, its experts quantized the way the Hub's
    are: per expert, [E, in, out] parameters as [out, in] rows of 32-value blocks and e8m0 scales."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        w = tensors.pop(name)  # [E, in, out]
        pairs = [mxfp4.quantize(w[e].t()) for e in range(w.shape[0])]
        tensors[f"{name}_blocks"] = torch.stack([b for b, _ in pairs])
        tensors[f"{name}_scales"] = torch.stack([s for _, s in pairs])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = hub.quantization_config()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 64 and intermediate 64: every row crosses two blocks (tests.hf_models' TINY has 24)
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return to_mxfp4(save_tiny("gpt_oss", root / "float", hidden_size=64, intermediate_size=64), root / "mxfp4")


def load_hf_mxfp4(path: Path) -> Any:
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.float32).eval()


async def _budgets(path: Path) -> dict[str, int]:
    async with Engine.open(path, device="cpu") as eng:
        block, top_k, total = eng.plan.block_bytes, eng.plan.top_k, eng.plan.total_expert_bytes
    smallest = block * top_k
    return {"smallest": smallest, "middle": (smallest + total) // 2, "full": total}


@pytest.mark.asyncio
async def test_matches_transformers_dequantized_path_at_every_budget(ckpt: Path) -> None:
    want, tokens = hf_reference(load_hf_mxfp4(ckpt))
    await assert_engine_matches(ckpt, want, tokens, tuple((await _budgets(ckpt)).values()))


@pytest.mark.asyncio
async def test_simulated_gpu_gives_the_cpu_logits_bit_for_bit(ckpt: Path) -> None:
    for name, budget in (await _budgets(ckpt)).items():
        runs = []
        for device in ("cpu", "sim"):
            async with Engine.open(ckpt, device=device, expert_budget=budget, io_chunk=4096) as eng:
                runs.append((await eng.logits(PROMPT), await eng.score(PROMPT + DECODE, stepwise=True)))
                if device == "sim":
                    assert eng.session.compute.sim.hazards == 0  # type: ignore[attr-defined]
        (cpu_prefill, cpu_steps), (sim_prefill, sim_steps) = runs
        assert torch.equal(sim_prefill, cpu_prefill) and torch.equal(sim_steps, cpu_steps), name


@pytest.mark.asyncio
async def test_store_keeps_the_checkpoint_bytes_at_a_quarter_of_bf16(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:  # no precision: an MXFP4 checkpoint stays MXFP4
        store = eng.session.store
        assert store.manifest.layout.precision == "mxfp4"
        arch = eng.session.arch
        raw = np.fromfile(store.data_path, dtype=np.uint8, count=store.blob_size, offset=store.offset(1, 3))
        view = store.layout.expert_view(torch.from_numpy(raw))  # layer 1, expert 3
    assert view.kind == "mxfp4"
    src = Checkpoint(ckpt)
    (gu_b, gu_s), (d_b, d_s) = hub.read_expert(src, arch, 1, 3)
    blocks = src.get("model.layers.1.mlp.experts.gate_up_proj_blocks")[3]
    assert torch.equal(view["gate_up.blocks"][: arch.expert_intermediate], blocks[0::2])  # gate rows, as stored
    assert torch.equal(view["gate_up.blocks"][arch.expert_intermediate:], blocks[1::2])
    for name, t in (("gate_up.blocks", gu_b), ("gate_up.scales", gu_s), ("down.blocks", d_b), ("down.scales", d_s)):
        assert torch.equal(view[name], t), name
    bias = src.get("model.layers.1.mlp.experts.gate_up_proj_bias")[3]
    assert torch.equal(view["gate_up_bias"], torch.cat([bias[0::2], bias[1::2]]))
    bf16 = mxfp4.Mxfp4Codec().layout(2880, 2880, (1.702, 7.0)).size  # gpt-oss-20b's expert
    from moeflow.store.codecs import codec_for

    assert bf16 / codec_for("bfloat16").layout(2880, 2880, (1.702, 7.0)).size <= 0.27


@pytest.mark.asyncio
async def test_float_precision_dequantizes_at_convert_to_the_same_logits(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        native = await eng.logits(PROMPT)
    async with Engine.open(ckpt, device="cpu", precision="float32") as eng:
        assert eng.session.store.manifest.layout.precision == "float32"
        assert torch.equal(await eng.logits(PROMPT), native)  # exact: every MXFP4 value is a float32
    async with Engine.open(ckpt, device="cpu", dtype="bfloat16") as eng:
        native = await eng.logits(PROMPT)
    async with Engine.open(ckpt, device="cpu", precision="bfloat16", dtype="bfloat16") as eng:
        assert torch.equal(await eng.logits(PROMPT), native)  # and a bfloat16 (e8m0 scales in its range)


@pytest.mark.asyncio
async def test_synth_writes_the_hub_layout_that_transformers_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    arch = synthesize(path, "gpt_oss", "tiny", progress=False)
    ckpt = Checkpoint(path)
    assert ckpt.config["quantization_config"] == hub.quantization_config()
    e, h, i = arch.num_experts, arch.hidden_size, arch.expert_intermediate
    blocks = ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert (blocks.shape, blocks.dtype) == ((e, 2 * i, h // 32, 16), torch.uint8)
    assert ckpt.info("model.layers.0.mlp.experts.down_proj_scales").shape == (e, h, i // 32)
    assert not ckpt.has("model.layers.0.mlp.experts.gate_up_proj")
    want, tokens = hf_reference(load_hf_mxfp4(path))
    await assert_engine_matches(path, want, tokens, ("smallest",))
    flat = synthesize(tmp_path / "bf16", "gpt_oss", "tiny", progress=False, quantization_config=None)
    assert flat.family == "gpt_oss" and Checkpoint(tmp_path / "bf16").has("model.layers.0.mlp.experts.gate_up_proj")


@pytest.mark.asyncio
async def test_bf16_checkpoint_quantizes_to_mxfp4_on_request(tmp_path: Path) -> None:
    path = save_tiny("gpt_oss", tmp_path / "float", hidden_size=64, intermediate_size=64)
    async with Engine.open(path, device="cpu", precision="mxfp4", expert_budget="50%") as eng:
        assert eng.session.store.manifest.layout.precision == "mxfp4"
        assert len((await eng.generate(PROMPT, 4)).tokens) == 4


@pytest.mark.parametrize(("config", "field"), [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config.quant_method"),
    ({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.experts"]}},
     "quantization_config.modules_to_not_convert"),
    ({"intermediate_size": 48}, "intermediate_size"),
])
def test_unhandled_variants_are_refused_naming_the_field(ckpt: Path, tmp_path: Path, config: dict[str, Any],
                                                         field: str) -> None:
    with pytest.raises(UnsupportedModel) as err:
        parse_arch(Checkpoint(copy_with_config(ckpt, tmp_path / "variant", **config)))
    assert err.value.field == field

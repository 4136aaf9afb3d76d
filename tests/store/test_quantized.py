"""Quantized experts: packing, the min-max references, quantized stores, and running from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow import Engine
from moeflow.cli import main
from moeflow.errors import ConfigError
from moeflow.store import quant
from moeflow.store.codecs import QuantCodec, codec_for
from tests.scheduling.conftest import PROMPTS, TRAINED


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits: int, rows: int, groups: int, seed: int) -> None:
    cols = groups * 8
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (rows, cols * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes)


@pytest.mark.parametrize(("bits", "group", "bound"), [(8, 64, 0.01), (4, 64, 0.12), (2, 32, 0.5)])
def test_min_max_quantization_error_is_bounded(bits: int, group: int, bound: float) -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scale, zero = quant.quantize(w, bits, group)
    back = quant.dequantize(q, scale, zero, bits, group)
    assert (back - w).norm() / w.norm() < bound
    # every group's error is within half a step (plus fp16 rounding of scale and zero)
    step = scale.float().repeat_interleave(group, dim=1)
    assert ((back - w).abs() <= 0.51 * step + 1e-4).all()


def test_codec_names_and_bad_group_sizes() -> None:
    assert codec_for("int4") == QuantCodec(4, 64)
    assert codec_for("int2").precision == "int2-g32"
    assert codec_for("int8-g128").group == 128
    with pytest.raises(ConfigError, match="int3"):
        codec_for("int3")
    with pytest.raises(ConfigError, match="not a multiple of group size 64"):
        codec_for("int4").layout(100, 64)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(TRAINED, dst, ignore=shutil.ignore_patterns(".moeflow", "routing_predictor*"))
    return dst


def test_convert_writes_every_precision_and_blobs_decode_close_to_the_weights(model: Path) -> None:
    assert main(["convert", str(model), "--precision", "bfloat16,int8,int4,int2"]) == 0
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.store import ExpertStore

    ckpt = Checkpoint(model)
    arch = parse_arch(ckpt)
    gate, up, down = (ckpt.get(n).float() for n in arch.naming.expert(2, 5))
    errors = {}
    for precision in ("int8-g64", "int4-g64", "int2-g32"):
        store = ExpertStore.open(model / ".moeflow" / precision, ckpt.fingerprint())
        off = store.offset(2, 5)
        raw = torch.frombuffer(bytearray(store.data_path.read_bytes()[off : off + store.blob_size]), dtype=torch.uint8)
        weights = codec_for(precision).decode(store.layout.views(raw), torch.float32)
        errors[precision] = float((weights["down"] - down).norm() / down.norm())
        assert store.blob_size < ExpertStore.open(model / ".moeflow" / "bfloat16", ckpt.fingerprint()).blob_size
    assert errors["int8-g64"] < errors["int4-g64"] < errors["int2-g32"] < 0.6


@pytest.mark.asyncio
async def test_quantized_experts_run_on_cpu_with_quality_ordered_by_bits(model: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        ids = eng.encode(PROMPTS[0] + PROMPTS[1])
        ref = torch.log_softmax(await eng.logits(ids), -1)
    kl = {}
    for precision in ("int8", "int4", "int2"):
        async with Engine.open(model, device="cpu", precision=precision, expert_budget="50%") as eng:
            got = torch.log_softmax(await eng.logits(ids), -1)
            kl[precision] = float((ref.exp() * (ref - got)).sum(-1).mean())
            res = await eng.generate(ids, 6, stop_at_eos=False)
            assert len(res.tokens) == 6 and eng.stats()["expert_precision"].startswith(precision)
    assert kl["int8"] < kl["int4"] < kl["int2"]
    assert kl["int8"] < 0.01


@pytest.mark.asyncio
async def test_miss_precision_degrades_only_misses_and_leaks_nothing(model: Path) -> None:
    async with Engine.open(model, device="cpu", expert_budget="100%") as eng:
        exact = [(await eng.generate(eng.encode(p), 8, stop_at_eos=False)).tokens for p in PROMPTS[:3]]
    async with Engine.open(model, device="cpu", expert_budget="30%", miss_precision="int4",
                           miss_thresholds=(0.0, 0.5)) as eng:
        got = [(await eng.generate(eng.encode(p), 8, stop_at_eos=False)).tokens for p in PROMPTS[:3]]
        s = eng.stats()
        assert s["low_precision_uses"] > 0
        assert s["pinned_blocks"] == 0 and s["miss_precision"] == "int4"
    # with T1 = T2 = 1 every miss loads high precision: exact again
    async with Engine.open(model, device="cpu", expert_budget="30%", miss_precision="int4",
                           miss_thresholds=(1.0, 1.0)) as eng:
        again = [(await eng.generate(eng.encode(p), 8, stop_at_eos=False)).tokens for p in PROMPTS[:3]]
        assert eng.stats()["low_precision_uses"] == 0
    assert again == exact
    assert sum(a == b for x, y in zip(got, exact, strict=True) for a, b in zip(x, y, strict=True)) >= 12


def test_miss_precision_options_are_validated(model: Path) -> None:
    with pytest.raises(ConfigError, match="miss_thresholds"):
        Engine.open(model, miss_precision="int4", miss_thresholds=(0.9, 0.6))
    with pytest.raises(ConfigError, match="int5"):
        Engine.open(model, miss_precision="int5")
    with pytest.raises(ConfigError, match="low_precision_share"):
        Engine.open(model, miss_precision="int4", low_precision_share=1.5)

"""Misses computed on the CPU from their host home (miss_compute, cpu_layers): on the simulated GPU
every placement gives the all-copy logits bit for bit; a slow link sends misses to the CPU, a
fast one copies them; cpu_layers' experts are never loaded; nothing stays pinned, even when a
forward pass is cancelled while CPU experts compute."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.errors import ConfigError
from moeflow.runtime import cpu_bf16
from moeflow.memory.device import SimDevice

PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]
DECODE = [11, 4, 90, 23, 7, 66]
CHUNK = 4096  # every tiny expert crosses several parts of a copy
# a 20 KiB expert takes 1 ms to copy: the CPU (~30 us, milliseconds on a loaded machine) is faster
SLOW: dict[str, Any] = dict(sim_bandwidth_gbps=0.02)
FAST: dict[str, Any] = dict(sim_bandwidth_gbps=500.0, sim_latency_us=0.0)  # 40 ns a copy: the CPU never is


async def _run(path: Path, **options: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    async with Engine.open(path, device="sim", io_chunk=CHUNK, prefetch="gate-lookahead", **options) as eng:
        prefill = await eng.logits(PROMPT)
        stepwise = await eng.score(PROMPT + DECODE, stepwise=True)
        stats = eng.stats().as_dict()
        sim = eng.session.compute
        assert isinstance(sim, SimDevice)
        stats["hazards"] = sim.sim.hazards
        stats["resident_layers"] = sorted({layer for layer, _ in eng.session.cache.resident()})
        stats["moe_layers"] = eng.session.arch.moe_layers
        stats["plan"], stats["plan_line"] = eng.session.plan_report(), eng.session.plan_line()
    return prefill, stepwise, stats


@pytest.mark.asyncio
async def test_misses_on_the_cpu_give_the_all_copy_logits_bit_for_bit(hf_checkpoints: Any) -> None:
    path = hf_checkpoints.path("mixtral")
    full_prefill, full_steps, _ = await _run(path)
    copy_prefill, copy_steps, copied = await _run(path, expert_budget="25%", **SLOW)
    assert torch.equal(copy_prefill, full_prefill) and torch.equal(copy_steps, full_steps)
    assert copied["cpu_expert_uses"] == 0 and copied["misses"] > 0
    for name, options in (("auto, slow link", dict(miss_compute="auto", **SLOW)),
                          ("auto, fast link", dict(miss_compute="auto", **FAST)),
                          ("cpu", dict(miss_compute="cpu", **FAST)),
                          ("cpu_layers=1", dict(cpu_layers=1, **FAST))):
        prefill, steps, stats = await _run(path, expert_budget="25%", **options)
        assert torch.equal(prefill, copy_prefill), f"{name}: prefill logits differ"
        assert torch.equal(steps, copy_steps), f"{name}: decode logits differ"
        assert stats["hazards"] == 0 and stats["pinned_blocks"] == 0, name
        share = stats["expert_use_share"]
        assert abs(sum(share.values()) - 1.0) < 1e-9, name
        if name == "auto, fast link":  # copying is cheaper: the cost model copies every miss
            assert stats["cpu_expert_uses"] == 0 and stats["misses"] > 0 and share["cpu"] == 0.0
        else:
            assert stats["cpu_expert_uses"] > 0 and share["cpu"] > share["copied"], (name, share)
        assert stats["cpu_expert_seconds"] > 0 or stats["cpu_expert_uses"] == 0
        assert stats["cpu_seconds_per_expert"] >= 0 and stats["cpu_seconds_per_row"] >= 0
        assert stats["cpu_seconds_per_expert"] + stats["cpu_seconds_per_row"] > 0  # one row: measured
        assert stats["link_source"] == "sim_bandwidth_gbps"
    # the slow link: every miss on the CPU is one the all-copy run had to load
    _, _, slow = await _run(path, expert_budget="25%", miss_compute="auto", **SLOW)
    assert slow["bytes_loaded"] < copied["bytes_loaded"]


@pytest.mark.parametrize("cpu_layers", [1, "1"])
@pytest.mark.asyncio
async def test_cpu_layers_experts_are_never_loaded_to_the_device(hf_checkpoints: Any, cpu_layers: int | str) -> None:
    """The first MoE layer (a count), or the second (an index: the one gate-lookahead prefetches
    into from the first) computes on the CPU; the device holds only the other layer's experts."""
    path = hf_checkpoints.path("mixtral")
    ref_prefill, ref_steps, _ = await _run(path)
    prefill, steps, stats = await _run(path, expert_budget="50%", cpu_layers=cpu_layers)
    assert torch.equal(prefill, ref_prefill) and torch.equal(steps, ref_steps)
    on_cpu = stats["moe_layers"][0] if cpu_layers == 1 else 1
    assert stats["cpu_layers"] == [on_cpu]
    assert on_cpu not in stats["resident_layers"] and stats["resident_layers"]
    assert stats["cpu_expert_uses"] > 0 and stats["miss_compute"] == "copy"
    assert stats["plan"]["cpu_layers"] == [on_cpu] and stats["plan_line"].endswith(f"; misses: copy, CPU layers {on_cpu}")


@pytest.mark.asyncio
async def test_three_tiers_compute_misses_from_the_host_cache(hf_checkpoints: Any) -> None:
    path = hf_checkpoints.path("mixtral")
    ref_prefill, ref_steps, _ = await _run(path)
    prefill, steps, stats = await _run(path, expert_budget="25%", host_budget="50%", miss_compute="cpu")
    assert torch.equal(prefill, ref_prefill) and torch.equal(steps, ref_steps)
    assert stats["cpu_expert_uses"] > 0 and stats["pinned_blocks"] == 0 and stats["hazards"] == 0


@pytest.mark.asyncio
async def test_low_precision_misses_and_the_cpu_share_the_layer(hf_checkpoints: Any) -> None:
    path = hf_checkpoints.path("mixtral")
    _, steps, stats = await _run(path, expert_budget="40%", miss_precision="int8", group_size=16, miss_thresholds=(0.0, 1.0),
                                 miss_compute="auto", **SLOW)
    assert torch.isfinite(steps).all()
    assert stats["cpu_expert_uses"] > 0 and stats["pinned_blocks"] == 0 and stats["hazards"] == 0
    assert abs(sum(stats["expert_use_share"].values()) - 1.0) < 1e-9


@pytest.mark.asyncio
async def test_a_forward_cancelled_while_cpu_experts_compute_leaves_nothing_pinned(tmp_path: Path) -> None:
    from tests.hf_models import save_tiny

    # 6 MiB experts: one takes milliseconds on the CPU, so the cancel lands while they compute
    path = save_tiny("mixtral", tmp_path / "wide", hidden_size=256, intermediate_size=2048, num_hidden_layers=2,
                     num_local_experts=4, num_attention_heads=4, num_key_value_heads=2)
    async with Engine.open(path, device="sim", expert_budget="50%", miss_compute="cpu", prefetch="none") as eng:

        async def cancel_mid_layer() -> tuple[int, int, int]:
            runner = eng.session.runner
            cpu = runner.cpu_experts
            assert cpu is not None
            seq = runner.new_sequence(PROMPT)
            task = asyncio.ensure_future(runner.forward(seq, PROMPT))
            deadline = time.monotonic() + 60
            while cpu.host.pinned_blocks() == 0:  # a CPU expert holds its host block
                assert not task.done() and time.monotonic() < deadline, "no CPU expert ever ran"
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return cpu.host.pinned_blocks(), eng.session.cache.pinned_blocks(), cpu.counters.uses

        host_pins, device_pins, _ = await eng.call(cancel_mid_layer)
        assert host_pins == 0 and device_pins == 0
        assert eng.stats().pinned_blocks == 0
        # the engine serves the next request, the same as ever
        assert len((await eng.generate(PROMPT, max_new_tokens=3, temperature=0.0)).tokens) == 3


@pytest.mark.asyncio
async def test_options_the_model_cannot_take_are_refused_at_open(hf_checkpoints: Any) -> None:
    path = hf_checkpoints.path("mixtral")  # two MoE layers
    with pytest.raises(ConfigError, match=r"^cpu_layers=3: the model has 2 MoE layers"):
        await Engine.open(path, device="sim", cpu_layers=3)
    with pytest.raises(ConfigError, match=r"^cpu_layers=\(7,\): layer.s. 7 are not MoE layers"):
        await Engine.open(path, device="sim", cpu_layers="7")
    if not torch.cuda.is_available():  # 'auto' resolves to the CPU: no second tier
        with pytest.raises(ConfigError, match=r"^miss_compute='auto': the engine runs on the CPU"):
            await Engine.open(path, device="auto", miss_compute="auto")


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_cpu_experts_on_a_gpu_match_the_copied_logits_within_bf16_tolerance(tmp_path: Path) -> None:
    """On a GPU the CPU's bf16 arithmetic differs from the GPU's: exact per placement, equal
    across placements only to the GPU tests' bf16 tolerance."""
    from tests.hf_models import save_tiny

    path = save_tiny("mixtral", tmp_path / "big", hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                     vocab_size=512)
    outs = {}
    for mode in ("copy", "cpu"):
        async with Engine.open(path, device="cuda", dtype="bfloat16", expert_budget="25%",
                               miss_compute=mode) as eng:
            logits = await eng.score(PROMPT + DECODE, stepwise=True)
            stats = eng.stats()
            assert stats.pinned_blocks == 0
            assert (stats.cpu_expert_uses > 0) == (mode == "cpu")
            outs[mode] = logits
    err = ((outs["cpu"] - outs["copy"]).abs().max() / outs["copy"].abs().max()).item()
    assert err <= 2e-2, f"max |diff| / max |logit| = {err:.4f}"


def test_the_gpus_cpu_path_is_the_faster_of_two_that_agree() -> None:
    """pick_path times the device's own arithmetic against float32 upcast on a real-sized expert
    and names the one it keeps; both give the expert's output to bf16 rounding."""
    from moeflow.runtime.cpu_experts import pick_path, upcast_ffn
    from moeflow.runtime.moe import expert_ffn
    from moeflow.store.layout import ExpertView

    torch.manual_seed(0)
    gate_up = (torch.randn(512, 256) / 16).to(torch.bfloat16)
    down = (torch.randn(256, 256) / 16).to(torch.bfloat16)
    weights = ExpertView({"gate_up": gate_up, "down": down}, 16, 0, gate_up.nbytes + down.nbytes)
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = expert_ffn(weights, x).float()
    got = upcast_ffn(weights, x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2
    path, ffn, speed = pick_path(weights, 256, torch.bfloat16, expert_ffn, threads=1)
    own = "bfloat16_moeflow" if cpu_bf16.ENABLED else "bfloat16_linear"  # runtime/cpu_bf16.py's kernel, or torch's
    assert (path, ffn) in ((own, expert_ffn), ("fp32_upcast", upcast_ffn))
    assert speed.seconds(1) > 0


def test_a_gpus_cpu_worker_keeps_off_one_cpu_for_the_event_loop() -> None:
    """worker_cpus leaves the first CPU free; the worker thread (and the OpenMP team it starts)
    runs on the rest, while the calling thread keeps every CPU."""
    import os

    from moeflow.runtime.cpu_experts import cpu_worker, worker_cpus

    every = os.sched_getaffinity(0)
    cpus = worker_cpus()
    if len(every) < 2:
        assert cpus is None
        return
    assert cpus == frozenset(sorted(every)[1:])
    pool = cpu_worker(cpus)
    try:
        assert pool.submit(os.sched_getaffinity, 0).result(timeout=30) == cpus
        assert os.sched_getaffinity(0) == every
    finally:
        pool.shutdown(wait=True)


@pytest.mark.asyncio
async def test_batched_requests_get_the_all_copy_tokens_with_misses_on_the_cpu(hf_checkpoints: Any) -> None:
    """Continuous batching groups several requests' tokens per expert; with misses on the CPU each
    request still gets the all-copy engine's tokens, and its logprobs to 1e-6: which requests share
    a step depends on arrival timing (CPU experts change it), and the all-copy engine itself gives
    a request's logprobs ~3e-8 apart batched and alone (at every budget)."""
    path = hf_checkpoints.path("mixtral")
    prompts = [PROMPT, DECODE + PROMPT[:3], PROMPT[::-1], [1, 2, 3]]

    async def batch(**options: Any) -> tuple[list[list[int]], list[list[float]], dict[str, Any]]:
        async with Engine.open(path, device="sim", io_chunk=CHUNK, expert_budget="25%", **SLOW, **options) as eng:
            results = await asyncio.gather(*(eng.generate(p, max_new_tokens=5, temperature=0.0, logprobs=1,
                                                          stop_at_eos=False) for p in prompts))
            stats = eng.stats().as_dict()
        return ([list(r.tokens) for r in results], [[lp.logprob for lp in r.logprobs or []] for r in results], stats)

    tokens, logprobs, _ = await batch()
    cpu_tokens, cpu_logprobs, stats = await batch(miss_compute="auto")
    assert cpu_tokens == tokens
    assert torch.allclose(torch.tensor(cpu_logprobs), torch.tensor(logprobs), rtol=0, atol=1e-6)
    assert stats["cpu_expert_uses"] > 0 and stats["pinned_blocks"] == 0


def test_the_cpu_path_is_named_for_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.runtime.cpu_experts import own_path_name
    from moeflow.store import quant
    from moeflow.store.layout import ExpertView

    dense = ExpertView({"gate_up": torch.zeros(8, 8, dtype=torch.bfloat16), "down": torch.zeros(8, 4, dtype=torch.bfloat16)})
    w: dict[str, torch.Tensor] = {}
    for name, (n, k) in (("gate_up", (64, 64)), ("down", (64, 32))):
        w[f"{name}.q"], w[f"{name}.scale"], w[f"{name}.zero"] = quant.quantize(torch.randn(n, k), 4, 32)
    int4 = ExpertView(w, 4, 32, kind="minmax")
    monkeypatch.setattr(cpu_bf16, "ENABLED", True)
    assert own_path_name(dense, torch.bfloat16) == "bfloat16_moeflow"
    assert own_path_name(int4, torch.bfloat16) == "int4_moeflow"
    monkeypatch.setattr(cpu_bf16, "ENABLED", False)
    assert own_path_name(dense, torch.bfloat16) == "bfloat16_linear"
    assert own_path_name(int4, torch.bfloat16) in ("int4_torch", "int4_dequant")


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("encoding", ["dense-bf16", "dense-f32", "int8", "int4", "int2"])
def test_the_named_cpu_path_is_the_one_expert_ffn_takes(monkeypatch: pytest.MonkeyPatch, enabled: bool,
                                                        dtype: torch.dtype, encoding: str) -> None:
    # own_path_name mirrors moe.expert_ffn's CPU dispatch to name it in stats(); spy on each
    # implementation expert_ffn may call and check the name is the one that ran.
    from moeflow.runtime import cpu_quant, moe, reference
    from moeflow.runtime.cpu_experts import own_path_name
    from moeflow.store import quant
    from moeflow.store.layout import ExpertView

    gen = torch.Generator().manual_seed(0)
    if encoding.startswith("dense"):
        wdtype = torch.bfloat16 if encoding == "dense-bf16" else torch.float32
        view = ExpertView({"gate_up": torch.randn(128, 64, generator=gen).to(wdtype),
                           "down": torch.randn(64, 64, generator=gen).to(wdtype)})
    else:
        bits = int(encoding.removeprefix("int"))
        w: dict[str, torch.Tensor] = {}
        for name, (n, k) in (("gate_up", (128, 64)), ("down", (64, 64))):
            w[f"{name}.q"], w[f"{name}.scale"], w[f"{name}.zero"] = quant.quantize(torch.randn(n, k, generator=gen),
                                                                                   bits, 32)
        view = ExpertView(w, bits, 32, kind="minmax")
    monkeypatch.setattr(cpu_bf16, "ENABLED", enabled)
    ran: list[str] = []

    def spy(module: object, attr: str, label: str) -> None:
        real = getattr(module, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            ran.append(label)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, wrapped)

    spy(cpu_bf16, "_kernel", "moeflow")  # every bf16 product of cpu_bf16.linear
    spy(cpu_bf16, "minmax_expert_ffn", "moeflow")
    spy(cpu_quant, "int4_expert_ffn", "torch")
    spy(reference, "quantized_expert_ffn", "dequant")
    moe.expert_ffn(view, torch.randn(3, 64, generator=gen).to(dtype))
    name = own_path_name(view, dtype)
    if encoding.startswith("dense"):
        want = "bfloat16_moeflow" if "moeflow" in ran else f"{str(dtype).removeprefix('torch.')}_linear"
    else:  # the first spy hit is expert_ffn's choice (the dequantizing reference's own products come after)
        want = f"{encoding}_{ran[0]}"
    assert name == want, (name, ran)

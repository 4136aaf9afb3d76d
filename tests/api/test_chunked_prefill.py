"""A prompt longer than prefill_chunk runs in bounded passes with the logits of one pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moeflow import Engine
from tests.conftest import HFCheckpoints
from tests.hf_models import FAMILIES, load_hf

# 13 tokens in passes of 4: three full chunks and a 1-token tail (which takes the decode path
# of attention and rope, so the tail's position bookkeeping is checked too).
PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8, 1, 2, 90]


async def _logits_and_tokens(path: Path, chunk: int) -> tuple[torch.Tensor, list[int]]:
    async with Engine.open(path, device="cpu", prefill_chunk=chunk) as eng:
        logits = await eng.logits(PROMPT)
        tokens = (await eng.generate(PROMPT, 6)).tokens
        assert eng.stats()["pinned_blocks"] == 0
    return logits, tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.asyncio
async def test_chunked_prefill_matches_one_pass_and_transformers(hf_checkpoints: HFCheckpoints, family: str) -> None:
    path = hf_checkpoints.path(family)
    chunked, chunked_tokens = await _logits_and_tokens(path, 4)
    whole, whole_tokens = await _logits_and_tokens(path, 512)
    assert chunked.shape == whole.shape == (len(PROMPT), whole.shape[1])
    # Not bitwise: float32 matmuls and SDPA pick kernels (and so a reduction order) by row
    # count, so a token's row rounds differently in a 4-row pass than in a 13-row one. The
    # difference measured is a few ulps (<= 1.2e-7 absolute on logits of magnitude ~1).
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-5), f"{family}: {(chunked - whole).abs().max():.2e}"
    assert chunked_tokens == whole_tokens
    with torch.no_grad():
        reference = load_hf(path)(torch.tensor([PROMPT])).logits[0].float()
    rel = (chunked - reference).abs().max() / reference.abs().max()
    assert rel < 1e-4, f"{family}: chunked logits differ from transformers by {rel:.2e} (relative)"


@pytest.mark.asyncio
async def test_chunk_equal_to_the_prompt_is_one_pass_bit_for_bit(hf_checkpoints: HFCheckpoints) -> None:
    path = hf_checkpoints.path("mixtral")
    exact, _ = await _logits_and_tokens(path, len(PROMPT))
    whole, _ = await _logits_and_tokens(path, 512)
    assert torch.equal(exact, whole)


@pytest.mark.asyncio
async def test_routing_trace_of_a_chunked_prompt_is_one_step(hf_checkpoints: HFCheckpoints) -> None:
    path = hf_checkpoints.path("qwen2_moe")
    traces = {}
    for chunk in (4, 512):
        async with Engine.open(path, device="cpu", prefill_chunk=chunk) as eng:
            traces[chunk] = await eng.trace(PROMPT, 3)
    assert traces[4] == traces[512]
    assert all(len(rows) == len(PROMPT) for rows in traces[4].prefill.values()) and len(traces[4].decode) == 2


async def _largest_allocation(eng: Engine, prompt: list[int]) -> int:
    """The largest CPU allocation of a one-token generate, profiled on the engine thread (where
    the steps run: the profiler sees the thread that starts it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        await eng.generate(prompt, 1)
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.asyncio
async def test_long_prompt_never_allocates_a_prompt_by_prompt_mask(hf_checkpoints: HFCheckpoints) -> None:
    """The memory of a prefill is bounded by the chunk: with prefill_chunk=16, no allocation of
    a 1024-token prefill is larger than twice one pass's float32 attention scores [N, 16, S]
    (SDPA's math path holds those; its flash path less), while one pass allocates at least a
    [T, T] boolean mask (T * T bytes), which shows the measurement sees it."""
    prompt = [i % 90 + 3 for i in range(1024)]
    largest = {}
    for chunk in (16, 4096):
        async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu", prefill_chunk=chunk) as eng:
            heads = eng.session.arch.attention.num_heads
            largest[chunk] = await eng.call(_largest_allocation, eng, prompt)
    assert largest[4096] >= len(prompt) ** 2, largest
    assert largest[16] <= 2 * heads * 16 * len(prompt) * 4, largest
    assert largest[16] * 8 < largest[4096], largest


@pytest.mark.asyncio
async def test_passes_shrink_so_attention_scores_stay_under_their_budget(hf_checkpoints: HFCheckpoints) -> None:
    """prefill_chunk caps a pass; so does the scores budget (1 GiB by default, set small here):
    a 1024-token prompt with prefill_chunk=4096 still runs in small passes, allocates nothing
    near one pass's [T, T] mask, and gives one pass's logits."""
    prompt = [i % 90 + 3 for i in range(1024)]
    largest, logits = {}, {}
    for budget in (None, 4 * 4 * 16 * 4096):  # 16 tokens per pass on this 4-head model
        async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu", prefill_chunk=4096) as eng:
            if budget is not None:
                eng.session.runner.scores_budget = budget
            largest[budget] = await eng.call(_largest_allocation, eng, prompt)
            logits[budget] = await eng.logits(prompt)
    assert largest[None] >= len(prompt) ** 2, largest
    assert largest[None] > 8 * largest[4 * 4 * 16 * 4096], largest
    assert torch.allclose(logits[None], logits[4 * 4 * 16 * 4096], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "sim"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.asyncio
async def test_chunked_prefill_on_an_accelerator_matches_one_pass(hf_checkpoints: HFCheckpoints, device: str,
                                                                  family: str) -> None:
    path = hf_checkpoints.path(family)
    out = {}
    for chunk in (4, 512):
        async with Engine.open(path, device=device, prefill_chunk=chunk) as eng:
            out[chunk] = (await eng.logits(PROMPT), (await eng.generate(PROMPT, 6)).tokens)
            assert eng.stats()["pinned_blocks"] == 0
    # float32 on either device; on a GPU the kernels also choose their reduction by shape
    assert torch.allclose(out[4][0], out[512][0], rtol=0, atol=1e-5), (out[4][0] - out[512][0]).abs().max()
    assert out[4][1] == out[512][1]


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_long_prompt_gpu_memory_is_bounded_by_the_chunk(hf_checkpoints: HFCheckpoints) -> None:
    """On the GPU the measure is the allocator's peak over the prefill of an 8192-token prompt:
    one pass needs at least a [T, T] mask (T * T bytes, 64 MiB; SDPA's float bias and scores
    make it ~2.8 GB on an H200), passes of 256 tokens a fraction of it (~91 MB there)."""
    prompt = [i % 90 + 3 for i in range(8192)]
    peak = {}
    for chunk in (256, 8192):
        async with Engine.open(hf_checkpoints.path("mixtral"), device="cuda", prefill_chunk=chunk) as eng:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            await eng.generate(prompt, 1)
            torch.cuda.synchronize()
            peak[chunk] = torch.cuda.max_memory_allocated() - before
    square = len(prompt) ** 2
    assert peak[8192] >= square, peak
    assert peak[256] * 8 < peak[8192], peak

"""Requests are checked whole before any compute: length against the context, sampling values,
seeds, token id types. Each refusal is an InvalidRequest naming the value, and the engine
has run nothing for it (no step, no expert load) and serves the next request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow import Engine
from moeflow.errors import InvalidRequest
from tests.conftest import HFCheckpoints

PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]
CONTEXT = 16


@pytest.fixture
def ckpt(hf_checkpoints: HFCheckpoints, tmp_path: Path) -> Path:
    """The tiny Mixtral with a 16-position context."""
    dst = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("mixtral"), dst, ignore=shutil.ignore_patterns(".moeflow"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _nothing_ran(eng: Engine) -> None:
    stats = eng.stats()
    assert (stats["tokens"], stats["misses"], stats["hits"], eng.session.steps) == (0, 0, 0, 0), stats
    assert stats["pinned_blocks"] == 0


@pytest.mark.asyncio
async def test_prompt_plus_new_tokens_beyond_the_context_is_refused_naming_both(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        with pytest.raises(InvalidRequest, match=r"10 tokens \+ max_new_tokens=7 = 17 .* context of 16") as info:
            await eng.generate(PROMPT, 7)
        assert "max_position_embeddings" in str(info.value)
        with pytest.raises(InvalidRequest, match="max_new_tokens=7"):
            async for _ in eng.stream(PROMPT, 7):
                pass
        long = list(range(3, 3 + CONTEXT + 1))
        with pytest.raises(InvalidRequest, match="17 tokens exceeds the model's context of 16"):
            await eng.logits(long)
        with pytest.raises(InvalidRequest, match="17 tokens exceeds"):
            await eng.score(long, stepwise=True)
        _nothing_ran(eng)
        res = await eng.generate(PROMPT, CONTEXT - len(PROMPT), stop_at_eos=False)  # exactly the context
        assert len(res.tokens) == CONTEXT - len(PROMPT)
        assert (await eng.logits(long[:CONTEXT])).shape[0] == CONTEXT


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("temperature", float("nan"), "finite"),
        ("temperature", float("inf"), "finite"),
        ("temperature", -0.5, ">= 0"),
        ("temperature", "0.7", "expected a number"),
        ("temperature", True, "expected a number"),
        ("top_p", float("nan"), "finite"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("top_p", True, "expected a number"),
        ("top_k", True, "got a bool"),
        ("top_k", 2.0, "got a float"),
        ("top_k", 0, "positive"),
        ("seed", 2**70, "64 bits"),
        ("seed", -(2**63) - 1, "64 bits"),
        ("seed", "abc", "got a str"),
        ("seed", True, "got a bool"),
        ("seed", 1.5, "got a float"),
    ],
)
@pytest.mark.asyncio
async def test_sampling_values_are_checked_before_any_compute(ckpt: Path, option: str, value: object,
                                                              why: str) -> None:
    sampling: dict[str, object] = {"temperature": 0.8, option: value}
    async with Engine.open(ckpt, device="cpu") as eng:
        with pytest.raises(InvalidRequest, match=f"{option}=.*{why}"):
            await eng.generate(PROMPT, 3, **sampling)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match=option):
            async for _ in eng.stream(PROMPT, 3, **sampling):  # type: ignore[arg-type]
                pass
        _nothing_ran(eng)
        assert len((await eng.generate(PROMPT, 2)).tokens) >= 1


@pytest.mark.asyncio
async def test_numpy_and_torch_scalars_are_plain_values(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        plain = await eng.generate(PROMPT, 4, temperature=0.9, top_k=5, top_p=0.9, seed=2**64 - 1, stop_at_eos=False)
        again = await eng.generate(  # the annotations name the plain types; their scalars are accepted too
            PROMPT, np.int64(4), temperature=np.float32(0.9), top_k=np.int64(5),  # type: ignore[arg-type]
            top_p=torch.tensor(0.9, dtype=torch.float64), seed=np.uint64(2**64 - 1), stop_at_eos=False,  # type: ignore[arg-type]
        )
        assert again.tokens == plain.tokens
        assert again.prompt_tokens == PROMPT and all(type(i) is int for i in again.prompt_tokens)


@pytest.mark.parametrize(
    "prompt",
    [
        np.array(PROMPT),
        np.array(PROMPT, dtype=np.int32),
        [np.int64(i) for i in PROMPT],
        [torch.tensor(i) for i in PROMPT],
        torch.tensor(PROMPT, dtype=torch.int32),
    ],
    ids=["numpy-array", "numpy-int32", "numpy-scalars", "torch-scalars", "torch-int32"],
)
@pytest.mark.asyncio
async def test_numpy_and_torch_integer_ids_are_token_ids(ckpt: Path, prompt: object) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        expected = await eng.generate(PROMPT, 3)
        res = await eng.generate(prompt, 3)  # type: ignore[arg-type]
        assert res.tokens == expected.tokens and res.prompt_tokens == PROMPT
        assert torch.equal(await eng.logits(prompt), await eng.logits(PROMPT))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        ([5.0, 17, 42], "token id 5.0 at position 0 is a float"),
        ([5, np.float32(17.0)], "at position 1 is a float32"),
        (np.array([5.0, 17.0]), "is a float64"),
        (torch.tensor([5.0, 17.0]), "integer tensor, got torch.float32"),
        ([5, True], "at position 1 is a bool"),
        ([5, "17"], "at position 1 is a str"),
        ([5, np.int64(96)], "token id 96 out of range"),
    ],
    ids=["float", "numpy-float", "numpy-float-array", "torch-float", "bool", "str", "numpy-out-of-range"],
)
@pytest.mark.asyncio
async def test_ids_that_are_not_integers_are_refused_saying_why(ckpt: Path, prompt: object, why: str) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        with pytest.raises(InvalidRequest, match=why) as info:
            await eng.generate(prompt, 2)  # type: ignore[arg-type]
        if "out of range" not in why:
            assert "never rounded" in str(info.value)
        _nothing_ran(eng)


@pytest.mark.asyncio
async def test_max_new_tokens_of_the_wrong_type_is_refused(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        for bad in (2.0, True, "3"):
            with pytest.raises(InvalidRequest, match="max_new_tokens="):
                await eng.generate(PROMPT, bad)  # type: ignore[arg-type]
        _nothing_ran(eng)

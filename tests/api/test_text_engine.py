"""Text done right at the engine: stop strings, stream_steps / stream_text (incremental, never a
broken character), logprobs, penalties through the step batcher, the tokenizer's own BOS, and
generation_config.json's EOS ids and sampling defaults."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from moeflow import Engine
from moeflow.errors import CheckpointError, InvalidRequest
from moeflow.request import StreamStep, steps
from moeflow.runtime.sampling import Sampler, SamplingParams
from moeflow.text import TextStream

PROMPT = "def parse(line):\n    "
N = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthesized tiny Mixtral with its byte-level tokenizer (generation_config: greedy, EOS 2)."""
    from moeflow.models.synth import synthesize

    out = tmp_path_factory.mktemp("text") / "tiny"
    synthesize(out, "mixtral", "tiny", dtype=torch.float32, progress=False)
    return out


def _copy(model: Path, dst: Path, generation: dict[str, object] | None = None) -> Path:
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns(".moeflow"))
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation))
    return dst


@pytest.mark.asyncio
async def test_a_stop_string_ends_generation_and_cuts_the_text_before_it(model: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        full = await eng.generate(PROMPT, N, stop_at_eos=False)
        assert full.text is not None and full.finish_reason == "length" and len(full.tokens) == N
        stop = full.text[len(full.text) // 2:][:3]  # a piece from the middle of the text
        cut = full.text.index(stop)
        res = await eng.generate(PROMPT, N, stop=[stop, "never-in-it"], stop_at_eos=False)
        assert res.finish_reason == "stop" and res.text == full.text[:cut]
        assert res.tokens == full.tokens[:len(res.tokens)] and len(res.tokens) < N  # ended there
        assert eng.decode(res.tokens).startswith(full.text[:cut] + stop)  # type: ignore[union-attr]
        pieces = [p async for p in eng.stream_text(PROMPT, N, stop=stop, stop_at_eos=False)]
        assert "".join(pieces) == res.text and all(pieces)
        ids = [t async for t in eng.stream(PROMPT, N, stop=stop, stop_at_eos=False)]
        assert ids == res.tokens
        with pytest.raises(InvalidRequest, match="stop="):
            await eng.generate(PROMPT, N, stop=[""])
        with pytest.raises(InvalidRequest, match="stop="):
            await eng.generate(PROMPT, N, stop=[3])  # type: ignore[list-item]
        assert eng.stats()["pinned_blocks"] == 0


@pytest.mark.asyncio
async def test_stream_steps_carry_token_text_and_finish_on_the_last_step_only(model: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        full = await eng.generate(PROMPT, N, stop_at_eos=False, logprobs=2)
        got = [s async for s in eng.stream_steps(PROMPT, N, stop_at_eos=False, logprobs=2)]
        assert [s.token for s in got] == full.tokens
        assert "".join(s.text for s in got) == full.text == eng.decode(full.tokens)
        assert [s.finish_reason for s in got] == [None] * (N - 1) + ["length"]
        assert [s.logprob for s in got] == full.logprobs


async def _tokens(ids: list[int]) -> AsyncGenerator[int, None]:
    for i in ids:
        yield i
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_steps_never_emit_a_broken_character_and_flush_held_text_on_the_last(model: Path) -> None:
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = "ok ✓ 日本語 😀 end"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text must split a character across tokens"
    sampler = Sampler(SamplingParams())
    out: list[StreamStep] = [s async for s in steps(_tokens(ids), sampler, TextStream(tokenizer, ["end!"]), set(),
                                                    len(ids))]
    assert all("\ufffd" not in s.text for s in out)
    assert "".join(s.text for s in out) == text
    assert out[-1].text.endswith("end") and out[-1].finish_reason == "length"  # held ("end" may start "end!")
    eos = [s async for s in steps(_tokens([*ids[:3], 2, 7]), sampler, TextStream(tokenizer), {2}, 10)]
    assert [s.token for s in eos] == [*ids[:3], 2] and eos[-1].finish_reason == "eos"


@pytest.mark.asyncio
async def test_logprobs_are_log_softmax_of_the_models_logits(model: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        res = await eng.generate(PROMPT, 6, stop_at_eos=False, logprobs=3)
        assert res.logprobs is not None and len(res.logprobs) == 6
        ids = res.prompt_tokens + res.tokens
        reference = torch.log_softmax((await eng.logits(ids)).double(), dim=-1)
        for i, entry in enumerate(res.logprobs):
            row = reference[len(res.prompt_tokens) - 1 + i]
            assert entry.token == res.tokens[i] == entry.top[0][0]  # greedy: the likeliest
            assert entry.logprob == pytest.approx(float(row[entry.token]), abs=1e-4)
            assert [t for t, _ in entry.top] == torch.topk(row, 3).indices.tolist()
        assert (await eng.generate(PROMPT, 2)).logprobs is None


@pytest.mark.asyncio
async def test_repetition_penalty_in_a_batch_matches_transformers_greedy_loop(model: Path) -> None:
    """The step batcher must not argmax a penalised request with the plain greedy ones."""
    penalty = 1.8
    async with Engine.open(model, device="cpu") as eng:
        prompt = eng.encode(PROMPT)
        plain, penalised = await asyncio.gather(
            eng.generate(prompt, 12, stop_at_eos=False),
            eng.generate(prompt, 12, stop_at_eos=False, repetition_penalty=penalty),
        )
        ids = list(prompt)
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        for _ in range(12):
            row = (await eng.logits(ids))[-1:]
            ids.append(int(processor(torch.tensor([ids]), row).argmax()))
        assert penalised.tokens == ids[len(prompt):]
        assert penalised.tokens != plain.tokens  # the penalty changed something
        alone = await eng.generate(prompt, 12, stop_at_eos=False, presence_penalty=1.5, frequency_penalty=1.0)
        both = await asyncio.gather(*(eng.generate(prompt, 12, stop_at_eos=False, presence_penalty=1.5,
                                                   frequency_penalty=1.0) for _ in range(2)),
                                    eng.generate(prompt, 12, stop_at_eos=False))
        assert both[0].tokens == both[1].tokens == alone.tokens != both[2].tokens


@pytest.mark.asyncio
async def test_encode_adds_bos_as_the_tokenizers_post_processor_does(model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = _copy(model, tmp_path / "bos")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    hf = AutoTokenizer.from_pretrained(str(path))
    async with Engine.open(path, device="cpu") as eng:
        for text in (PROMPT, "x = 1", "héllo 日本"):
            assert eng.encode(text) == hf(text)["input_ids"]
            assert eng.encode(text)[0] == 1
            assert eng.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        res = await eng.generate(PROMPT, 2)
        assert res.prompt_tokens == eng.encode(PROMPT) and res.prompt_tokens[0] == 1


@pytest.mark.asyncio
async def test_generation_config_gives_eos_ids_and_sampling_defaults(model: Path, tmp_path: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        base = await eng.generate(PROMPT, N, stop_at_eos=False)
        sampled = await eng.generate(PROMPT, N, temperature=0.7, top_k=5, seed=3, stop_at_eos=False)
    end = base.tokens[5]
    path = _copy(model, tmp_path / "gen", {"eos_token_id": [end, 2], "do_sample": False, "temperature": 0.7})
    async with Engine.open(path, device="cpu") as eng:
        assert eng.eos_token_ids[0] == end and 2 in eng.eos_token_ids
        res = await eng.generate(PROMPT, N)  # do_sample false: greedy despite the temperature
        cut = base.tokens.index(end) + 1
        assert res.finish_reason == "eos" and res.tokens == base.tokens[:cut]
        steps = [s async for s in eng.stream_steps(PROMPT, N)]
        assert [s.token for s in steps] == res.tokens and steps[-1].finish_reason == "eos"
    path = _copy(model, tmp_path / "sample", {"do_sample": True, "temperature": 0.7, "top_k": 5})
    async with Engine.open(path, device="cpu") as eng:
        assert (await eng.generate(PROMPT, N, seed=3, stop_at_eos=False)).tokens == sampled.tokens
        assert (await eng.generate(PROMPT, N, temperature=0, stop_at_eos=False)).tokens == base.tokens


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"eos_token_id": "</s>"}, "eos_token_id"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"do_sample": True, "temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
@pytest.mark.asyncio
async def test_a_bad_generation_config_is_refused_naming_file_and_field(
        model: Path, tmp_path: Path, content: dict[str, object], field: str) -> None:
    path = _copy(model, tmp_path / "bad", content)
    with pytest.raises(CheckpointError, match=rf"generation_config.json: field '{field}'") as info:
        async with Engine.open(path, device="cpu"):
            pass
    assert info.value.field == field


@pytest.mark.asyncio
async def test_a_list_of_prompts_where_one_belongs_points_to_generate_batch(model: Path) -> None:
    async with Engine.open(model, device="cpu") as eng:
        for prompts in (["a", "b"], [[1, 2], [3, 4]], torch.tensor([[1, 2], [3, 4]])):
            with pytest.raises(InvalidRequest, match="generate_batch"):
                await eng.generate(prompts, 2)  # type: ignore[arg-type]
            with pytest.raises(InvalidRequest, match="generate_batch"):
                async for _ in eng.stream(prompts, 2):  # type: ignore[arg-type]
                    pass
        assert [r.tokens for r in await eng.generate_batch(["a", "b"], 2)] == [
            (await eng.generate("a", 2)).tokens, (await eng.generate("b", 2)).tokens]

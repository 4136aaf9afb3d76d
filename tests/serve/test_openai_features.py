"""The live server with the official openai client: logprobs, penalties and min_p, several prompts per request,
tools in chat, and the memory plan at /v1/models."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import torch

from moeflow.api import Engine
from moeflow.serve import create_app
from tests.serve.conftest import engine_options, live_server, wait_idle
from tests.serve.test_tools import CLOCK, MISTRAL, QWEN25, WEATHER

MODEL = "tiny"
PROMPT = "def fibonacci(n):"


@pytest_asyncio.fixture
async def served(tiny_model: Path) -> AsyncIterator[tuple[Engine, openai.AsyncOpenAI, str]]:
    async with Engine.open(tiny_model, **engine_options()) as eng:
        async with live_server(create_app(eng, model_name=MODEL)) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                yield eng, client, url


async def _steps(eng: Engine, prompt: str | list[int], max_tokens: int, **sampling: Any) -> tuple[str, list[Any]]:
    """(text, logprob entries) of the engine's own stream, the server's reference."""
    text, entries = "", []
    async for step in eng.stream_steps(prompt, max_tokens, **sampling):
        text += step.text
        if step.logprob is not None:
            entries.append(step.logprob)
    return text, entries


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_completion_logprobs_are_the_models_own_distribution(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = done.choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert choice.logprobs.token_logprobs is not None and choice.logprobs.top_logprobs is not None
    ids = eng.encode(PROMPT)
    generated = (await eng.generate(PROMPT, 6, temperature=0)).tokens
    assert choice.text == eng.decode(generated)
    # independent of the sampler: log_softmax of the prefill logits over prompt + output, row by row
    rows = torch.log_softmax((await eng.logits(ids + generated[:-1]))[len(ids) - 1:], dim=-1)
    for k, token in enumerate(generated):
        assert choice.logprobs.token_logprobs[k] == pytest.approx(float(rows[k, token]), abs=2e-3)
        top = rows[k].topk(3)
        expected = {eng.decode([int(t)]) or "": float(v) for t, v in zip(top.indices, top.values, strict=True)}
        got = choice.logprobs.top_logprobs[k]
        assert set(expected) <= set(got) and len(got) <= 4
        assert all(got[t] == pytest.approx(v, abs=2e-3) for t, v in expected.items())
    assert choice.logprobs.tokens == [eng.decode([t]) for t in generated]
    assert choice.logprobs.text_offset == [len("".join(choice.logprobs.tokens[:k])) for k in range(6)]
    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True)]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((lp.tokens or [] for lp in streamed), []) == choice.logprobs.tokens
    assert sum((lp.text_offset or [] for lp in streamed), []) == choice.logprobs.text_offset
    assert sum((lp.token_logprobs or [] for lp in streamed), []) == choice.logprobs.token_logprobs


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_chat_logprobs_streamed_and_not(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    messages: Any = [{"role": "user", "content": "Sort a list."}]
    rendered = "<|im_start|>user\nSort a list.<|im_end|>\n<|im_start|>assistant\n"
    _, entries = await _steps(eng, eng.encode(rendered, add_special_tokens=False), 5, temperature=0, logprobs=2)
    done = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2)
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry, ref in zip(content, entries, strict=True):
        assert entry.token == eng.decode([ref.token]) and entry.logprob == pytest.approx(ref.logprob)
        assert [t.token for t in entry.top_logprobs] == [eng.decode([t]) for t, _ in ref.top]
        assert entry.bytes is not None
    assert done.choices[0].message.content == bytes(b for e in content for b in e.bytes or []).decode(
        "utf-8", errors="replace")  # the entries' bytes are the text's
    plain = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                                 logprobs=True)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []  # type: ignore[union-attr,index]
    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True)]
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    nothing = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert nothing.choices[0].logprobs is None


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_penalties_and_min_p_reach_the_sampler(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    ids = eng.encode(PROMPT)
    greedy = (await eng.generate(PROMPT, 12, temperature=0)).tokens
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                           frequency_penalty=2.0)
    # recomputed here: each token is the argmax of the logits less 2 x how often it was generated
    tokens: list[int] = []
    for _ in range(12):
        row = (await eng.logits(ids + tokens))[-1]
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=row.shape[0]).to(row.dtype)
        tokens.append(int(torch.argmax(row - 2.0 * counts)))
    assert done.choices[0].text == eng.decode(tokens)
    assert tokens != greedy  # this prompt's greedy output repeats itself, so the penalty changes it
    for extra in ({"presence_penalty": 1.5}, {"repetition_penalty": 1.3}, {"min_p": 0.2, "seed": 5, "temperature": 1.0}):
        args = {"temperature": 0.0, **extra}
        expected, _ = await _steps(eng, PROMPT, 10, **args)
        got = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                              extra_body={k: v for k, v in args.items()})
        assert got.choices[0].text == expected, extra


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_several_prompts_give_n_choices_each_indexed_as_vllm(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    prompts = [PROMPT, "class Stack:", "import os\n"]
    done = await client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=1.0, seed=3, n=2)
    assert [c.index for c in done.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=1.0, seed=3, n=2)
        assert [c.text for c in done.choices[2 * p:2 * p + 2]] == [c.text for c in alone.choices]
    assert done.usage is not None
    assert done.usage.prompt_tokens == sum(len(eng.encode(p)) for p in prompts)  # once per prompt, not per choice
    assert done.usage.completion_tokens == 30
    ids = [eng.encode(p) for p in prompts[:2]]
    as_ids = await client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    texts = [(await eng.generate(i, 5, temperature=0)).text for i in ids]
    assert [c.text for c in as_ids.choices] == texts
    stream = await client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    got = ["", ""]
    finished = []
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            got[c.index] += c.text
            if c.finish_reason:
                finished.append(c.index)
        usage = chunk.usage or usage
    assert got == texts and sorted(finished) == [0, 1]
    assert usage is not None and usage.prompt_tokens == sum(map(len, ids)) and usage.completion_tokens == 10
    assert await wait_idle(eng) == (0, 0)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_models_shows_the_memory_plan(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, _, url = served
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        plan = (await http.get("/v1/models")).json()["data"][0]["plan"]
    report = eng.session.plan_report()
    assert plan == json.loads(json.dumps({**report, "expert_slots": eng.plan.slots}))
    assert plan["slots"]["fast"] == eng.plan.slots and "kv_capacity_tokens" in plan and "predictor" in plan


# each template with the opening a named tool_choice appends to its prompt
TOOL_FORMATS = {
    "qwen2.5": ({"chat_template": QWEN25, "eos_token": "<|im_end|>"}, '<tool_call>\n{"name": "get_time", "arguments": '),
    "mistral": ({"chat_template": MISTRAL, "bos_token": "<s>", "eos_token": "</s>"},
                '[TOOL_CALLS] [{"name": "get_time", "arguments": '),
}


@pytest_asyncio.fixture(params=sorted(TOOL_FORMATS))
async def tool_served(model_copy: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Engine, openai.AsyncOpenAI, Path, str]]:
    config, prefix = TOOL_FORMATS[request.param]
    (model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    async with Engine.open(model_copy, **engine_options()) as eng:
        async with live_server(create_app(eng, model_name=MODEL)) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                yield eng, client, model_copy, prefix


def _reference_prompt(path: Path, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    from tests.serve.test_tools import _transformers_render

    return _transformers_render(path, messages, tools)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_chat_with_tools_renders_them_and_returns_a_plain_answer_as_content(
        tool_served: tuple[Engine, openai.AsyncOpenAI, Path, str]) -> None:
    eng, client, path, _ = tool_served
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    rendered = _reference_prompt(path, messages, [WEATHER, CLOCK])
    assert "get_weather" in rendered
    ids = eng.encode(rendered, add_special_tokens=False)
    expected = await eng.generate(ids, 6, temperature=0)
    assert "<tool_call>" not in (expected.text or "") and "[TOOL_CALLS]" not in (expected.text or "")  # checked
    done = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK],  # type: ignore[list-item]
                                                max_tokens=6, temperature=0)
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)  # the prompt held the tools
    assert done.choices[0].message.content == expected.text
    assert not done.choices[0].message.tool_calls and done.choices[0].finish_reason == "length"
    chunks = [c async for c in await client.chat.completions.create(  # type: ignore[union-attr]
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=6, temperature=0, stream=True)]  # type: ignore[list-item]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # the history of a call and its result renders, and is what the model reads
    history: Any = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": "21 C"}]  # 9-character ids, as Mistral's template wants
    again = await client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=2,  # type: ignore[list-item]
                                                 temperature=0)
    from moeflow.serve.tools import template_messages

    reference = _reference_prompt(path, template_messages(history), [WEATHER])
    assert again.usage is not None and again.usage.prompt_tokens == len(eng.encode(reference, add_special_tokens=False))


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_named_tool_choice_returns_a_call_of_that_function(
        tool_served: tuple[Engine, openai.AsyncOpenAI, Path, str]) -> None:
    eng, client, path, prefix = tool_served
    messages: Any = [{"role": "user", "content": "Time?"}]
    choice: Any = {"type": "function", "function": {"name": "get_time"}}
    ids = eng.encode(_reference_prompt(path, messages, [WEATHER, CLOCK]) + prefix, add_special_tokens=False)
    written = (await eng.generate(ids, 6, temperature=0)).text or ""
    done = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK],  # type: ignore[list-item]
                                                tool_choice=choice, max_tokens=6, temperature=0)
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)  # the forced opening is in the prompt
    calls = done.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_time"  # type: ignore[union-attr]
    assert calls[0].function.arguments == written.split("</tool_call>")[0].strip()  # type: ignore[union-attr]
    chunks = [c async for c in await client.chat.completions.create(  # type: ignore[union-attr]
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=6, temperature=0,  # type: ignore[list-item]
        stream=True)]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [  # type: ignore[union-attr]
        (0, "get_time", calls[0].function.arguments)]  # type: ignore[union-attr]
    assert all(not (c.choices[0].delta.content or "") for c in chunks if c.choices)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_ignore_eos_generates_past_the_end_of_sequence(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    prompt = "def task_17(x):\n    return x + x + "  # greedy output ends with EOS after 11 tokens
    ended = await eng.generate(prompt, 20, temperature=0)
    assert ended.finish_reason == "eos" and len(ended.tokens) < 20
    done = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert done.choices[0].finish_reason == "stop" and done.usage is not None
    assert done.usage.completion_tokens == len(ended.tokens)
    past = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert past.choices[0].finish_reason == "length" and past.usage is not None and past.usage.completion_tokens == 20
    assert past.choices[0].text == (await eng.generate(prompt, 20, temperature=0, stop_at_eos=False)).text


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_bos_is_added_to_completion_prompts_but_not_to_rendered_chats(model_copy: Path) -> None:
    """With a tokenizer whose post-processor adds BOS (as Llama's and Mistral's do): a completion's
    prompt gets it from the tokenizer, a chat's from the template, never twice."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_file(str(model_copy / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(model_copy / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (model_copy / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    async with Engine.open(model_copy, **engine_options()) as eng:
        async with live_server(create_app(eng, model_name=MODEL)) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                done = await client.completions.create(model=MODEL, prompt="hi there", max_tokens=1, temperature=0)
                chat = await client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                                            messages=[{"role": "user", "content": "hi there"}])
        bare = tok.encode("hi there", add_special_tokens=False).ids
        assert done.usage is not None and done.usage.prompt_tokens == len(bare) + 1  # the tokenizer's BOS
        rendered = tok.encode("<s>[INST] hi there [/INST]", add_special_tokens=False).ids
        assert rendered.count(1) == 1  # the template's BOS
        assert chat.usage is not None and chat.usage.prompt_tokens == len(rendered)  # and no second one

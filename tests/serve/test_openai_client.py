"""A live uvicorn server driven by the official openai client: completions and chat, streamed and not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from moeflow.api import Engine
from moeflow.serve import create_app
from tests.serve.conftest import engine_options, live_server, wait_idle

MODEL = "tiny"
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]


@pytest_asyncio.fixture
async def served(tiny_model: Path) -> AsyncIterator[tuple[Engine, openai.AsyncOpenAI, str]]:
    async with Engine.open(tiny_model, **engine_options()) as eng:
        async with live_server(create_app(eng, model_name=MODEL, max_queue=2)) as url:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
                yield eng, client, url


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_completion_streamed_and_not_give_the_engines_greedy_text(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    solo = await eng.generate(PROMPT, 12)
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == solo.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(solo.prompt_tokens), 12)
    assert done.usage.total_tokens == len(solo.prompt_tokens) + 12
    chunks = [c async for c in await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == solo.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_chat_streamed_and_not_use_the_template_and_agree(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    rendered = ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nSort a list.<|im_end|>\n"
                "<|im_start|>assistant\n")
    solo = await eng.generate(rendered, 10)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == solo.text
    assert done.usage is not None and done.usage.prompt_tokens == len(solo.prompt_tokens)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                                  stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == solo.text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_stop_string_ends_the_text_before_it(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, _ = served
    full = (await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)).choices[0].text
    start = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]
    expected = full[: full.index(stop)]
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                           stop=["never-in-it", stop])
    assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")
    assert done.usage is not None and done.usage.completion_tokens < 16 or full.endswith(stop)
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                             stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert await wait_idle(eng) == (0, 0)


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_same_seeded_request_twice_gives_the_same_text(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    _, client, _ = served

    async def sample(seed: int) -> list[str]:
        done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,  # type: ignore[arg-type]
                                                    temperature=1.0, top_p=0.95, seed=seed, n=2)
        return [c.message.content or "" for c in done.choices]

    first = await sample(7)
    assert await sample(7) == first
    assert first[0] != first[1]  # n choices draw with seeds seed, seed + 1
    assert await sample(8) != first
    streamed = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3,
                                               stream=True)
    text = "".join([c.choices[0].text async for c in streamed])
    again = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3)
    assert again.choices[0].text == text


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_n_streamed_choices_each_equal_their_own_request(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    _, client, _ = served
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11,
                                             n=2, stream=True)
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    for index in (0, 1):
        alone = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                                seed=11 + index)
        assert alone.choices[0].text == texts[index]


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_models_health_and_queue_full(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, url = served
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
        assert card["plan"]["expert_slots"] == eng.plan.slots and card["max_model_len"] == 4096
        assert (await http.get("/health")).json() == {"status": "ok"}
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as first, \
                http.stream("POST", "/v1/completions", json=body) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            await anext(first.aiter_lines())
            refused = await http.post("/v1/completions", json=body)  # max_queue=2: a third is refused
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        # both streams were left after one line: their requests are cancelled, their KV and pins freed
        assert await wait_idle(eng) == (0, 0)
        assert 'moeflow_completions_finished_total{finish_reason="cancelled"} 2.0' in (await http.get("/metrics")).text
        assert eng.stats()["tokens"] < 1000  # stopped long before their 2000 tokens
        again = await http.post("/v1/completions", json={**body, "max_tokens": 2, "stream": False})
        assert again.status_code == 200
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="other", prompt=PROMPT, max_tokens=2)


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_non_streamed_request_is_cancelled_when_its_client_leaves(served: tuple[Engine, openai.AsyncOpenAI, str]) -> None:
    eng, client, url = served
    ids = eng.encode(PROMPT)
    solo = await eng.generate(ids, 6)
    done = await client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)  # token ids
    assert done.choices[0].text == solo.text
    tokens = eng.stats()["tokens"]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=0.5)) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            await http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3000,
                                                          "temperature": 0})
        assert await wait_idle(eng) == (0, 0)
        metrics = (await http.get("/metrics")).text
    assert 'moeflow_completions_finished_total{finish_reason="cancelled"} 1.0' in metrics
    assert eng.stats()["tokens"] - tokens < 1500  # stopped long before its 3000 tokens

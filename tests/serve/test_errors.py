"""Every bad request gets its OpenAI error body and status, naming the field, before any compute."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from moeflow.api import Engine
from moeflow.serve import create_app
from tests.serve.conftest import engine_options

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest_asyncio.fixture
async def client(tiny_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with Engine.open(tiny_model, **engine_options()) as eng:
        app = create_app(eng, model_name="tiny")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moeflow") as c:
            yield c


def _error(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


BAD_COMPLETIONS: list[tuple[dict[str, Any], str]] = [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["one", 2]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, 2], [3, 99999]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "seed": 1 << 70}, "seed"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"prompt": "x", "model": 7}, "model"),
]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS, ids=[json.dumps(b)[:40] for b, _ in BAD_COMPLETIONS])
async def test_bad_completion_request_is_400_naming_the_field(client: httpx.AsyncClient, body: dict[str, Any],
                                                              param: str) -> None:
    error = _error(await client.post(COMPLETIONS, json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("body", "param"), [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "temperature": None, "top_p": -1}, "top_p"),
    ({"messages": USER, "logprobs": 3}, "logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
     "tool_choice"),
    # the checkpoint's ChatML template renders no tools: offering some would be silently dropped
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
async def test_bad_chat_request_is_400_naming_the_field(client: httpx.AsyncClient, body: dict[str, Any],
                                                        param: str) -> None:
    _error(await client.post(CHAT, json=body), 400, param)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_body_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(COMPLETIONS, content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(response, 400, None)["message"]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    for path, body in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": USER})):
        error = _error(await client.post(path, json={**body, "model": "gpt-4"}), 404, "model")
        assert error["code"] == "model_not_found" and "'gpt-4'" in error["message"] and "'tiny'" in error["message"]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_prompt_longer_than_the_context_is_400_naming_both_lengths(client: httpx.AsyncClient) -> None:
    error = _error(await client.post(COMPLETIONS, json={"prompt": [5] * 4000, "max_tokens": 200}), 400, "max_tokens")
    assert "4000" in error["message"] and "4096" in error["message"]
    # chat with no max_tokens: the prompt alone fills the context
    long = [{"role": "user", "content": "word " * 5000}]
    error = _error(await client.post(CHAT, json={"messages": long}), 400, "messages")
    assert "4096" in error["message"]
    prompt = int(error["message"].split("the prompt is ")[1].split(" ")[0])
    assert prompt > 4096


@contextlib.asynccontextmanager
async def _client_without(model: Path, name: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over `model` with its file `name` removed."""
    (model / name).unlink()
    async with Engine.open(model, **engine_options()) as eng:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(eng)), base_url="http://m") as c:
            yield c


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_chat_on_a_checkpoint_without_template_is_400_saying_so(model_copy: Path) -> None:
    async with _client_without(model_copy, "tokenizer_config.json") as c:
        error = _error(await c.post(CHAT, json={"messages": USER, "max_tokens": 2}), 400, "messages")
        assert "no chat template" in error["message"]
        ok = await c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "model": "model"})
        assert ok.status_code == 200  # the model name defaults to the folder's


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_template_refusing_the_messages_is_400(model_copy: Path) -> None:
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    (model_copy / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    async with Engine.open(model_copy, **engine_options()) as eng:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(eng)), base_url="http://m") as c:
            error = _error(await c.post(CHAT, json={"messages": USER}), 400, "messages")
            assert "a system message must come first" in error["message"]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_unknown_route_gets_the_error_body(client: httpx.AsyncClient) -> None:
    _error(await client.get("/v1/engines"), 404, None)
    assert (await client.get("/v1/completions")).status_code == 405


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_errors_are_counted_by_endpoint_and_status(client: httpx.AsyncClient) -> None:
    await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 0})
    await client.post(COMPLETIONS, json={"prompt": "x", "model": "nope"})
    await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
    metrics = (await client.get("/metrics")).text
    assert 'moeflow_http_requests_total{endpoint="/v1/completions",status="400"} 1.0' in metrics
    assert 'moeflow_http_requests_total{endpoint="/v1/completions",status="404"} 1.0' in metrics
    assert 'moeflow_http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    assert "moeflow_completion_tokens_total 2.0" in metrics


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_checkpoint_without_tokenizer_is_refused_with_a_reason(model_copy: Path) -> None:
    async with _client_without(model_copy, "tokenizer.json") as c:
        error = _error(await c.post(COMPLETIONS, json={"prompt": [1, 2, 3], "max_tokens": 2}), 400, None)
        assert "no tokenizer.json" in error["message"]

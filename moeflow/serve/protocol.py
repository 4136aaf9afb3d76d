"""The OpenAI request bodies moeflow serves: parsed and checked into plain records, or an APIError naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moeflow.serve.api_error import APIError, bad
from moeflow.serve.tools import Tools, parse_tools, template_messages

__all__ = ["APIError", "CompletionRequest", "bad", "parse_request"]

# Parameters of the OpenAI API that moeflow does not implement: a request that sets one to
# anything but its neutral value is refused, never silently ignored.
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "echo": (None, False), "best_of": (None, 1), "suffix": (None,), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}
MAX_LOGPROBS = 20  # top alternatives per token, as vLLM's default max_logprobs and the chat API's top_logprobs


@dataclass(frozen=True)
class CompletionRequest:
    """One /v1/completions or /v1/chat/completions request, checked."""

    chat: bool
    model: str | None
    prompts: tuple[str | list[int], ...]  # completions: one or several; chat: ()
    messages: list[dict[str, Any]] | None  # chat
    max_tokens: int | None  # None: up to the model's context
    temperature: float | None  # None: the model's generation_config.json, else 1.0
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; 0: the chosen token's; k: and the k most likely
    tools: Tools | None  # chat: the functions offered and how the model may use them
    ignore_eos: bool = False  # vLLM's: generate past EOS up to max_tokens (benchmarks)


def _int(body: dict[str, Any], name: str, *, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise bad(name, f"must be >= {minimum}, got {value}")
    return value


def _float(body: dict[str, Any], name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return value


def _top_k(body: dict[str, Any]) -> int | None:
    """top_k, with vLLM's -1 (and 0) for "all tokens", which clients written for it send."""
    value = _int(body, "top_k", minimum=-1)
    return None if value is None or value <= 0 else value


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _prompts(value: object) -> tuple[str | list[int], ...]:
    """A text, a list of token ids, or a non-empty list of those (several prompts, each with its
    own n choices, as the OpenAI API and vLLM take them)."""
    if isinstance(value, str):
        return (value,)
    if _token_ids(value):
        assert isinstance(value, list)
        return (list(value),)
    if isinstance(value, list) and value:
        out: list[str | list[int]] = []
        for i, p in enumerate(value):
            if isinstance(p, str):
                out.append(p)
            elif _token_ids(p):
                out.append(list(p))
            else:
                raise bad("prompt", f"prompt[{i}]: expected a string or a non-empty list of token ids, got {p!r:.40}")
        return tuple(out)
    raise bad("prompt", "expected a string, a non-empty list of token ids, or a list of those")


def _messages(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", "expected an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append(m)
    return out


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise bad("stop", "expected a non-empty string or a list of them")
    if len(value) > 4:
        raise bad("stop", f"at most 4 stop strings, got {len(value)}")
    return tuple(value)


def parse_request(body: object, *, chat: bool) -> CompletionRequest:
    """The checked request, or APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise bad(name, f"{body[name]!r} is not supported by moeflow")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    prompts: tuple[str | list[int], ...] = ()
    messages = None
    tools = None
    if chat:
        if "messages" not in body:
            raise bad("messages", "missing: a chat completion needs messages")
        messages = template_messages(_messages(body["messages"]))
        tools = parse_tools(body)
    else:
        if body.get("prompt") is None:
            raise bad("prompt", "missing: a completion needs a prompt")
        prompts = _prompts(body["prompt"])
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise bad(name, "tools are for /v1/chat/completions")
    max_tokens = _int(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      minimum=1)
    if max_tokens is None and not chat:
        max_tokens = 16  # the completions API's documented default
    temperature = _float(body, "temperature", 0.0, 2.0)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"expected a boolean, got {stream!r}")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options", "expected {\"include_usage\": bool}")
    if options is not None and not stream:
        raise bad("stream_options", "only allowed when stream is true")
    return CompletionRequest(
        chat=chat, model=model, prompts=prompts, messages=messages, max_tokens=max_tokens,
        temperature=temperature, top_p=_float(body, "top_p", 0.0, 1.0, lo_open=True), top_k=_top_k(body),
        min_p=_float(body, "min_p", 0.0, 1.0), seed=_int(body, "seed"),
        presence_penalty=_float(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", -2.0, 2.0),
        repetition_penalty=_float(body, "repetition_penalty", 0.0, math.inf, lo_open=True),
        stop=_stop(body.get("stop")), n=_int(body, "n", minimum=1) or 1,
        stream=stream, include_usage=bool(options and options.get("include_usage")),
        logprobs=_logprobs(body, chat=chat), tools=tools, ignore_eos=_bool(body, "ignore_eos"),
    )


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(name, f"expected a boolean, got {value!r}")
    return bool(value)


def _logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many alternatives per token to return: completions' `logprobs: k`; chat's
    `logprobs: true` with `top_logprobs: k`. None: no log-probabilities."""
    if not chat:
        value = _int(body, "logprobs", minimum=0)
        if value is not None and value > MAX_LOGPROBS:
            raise bad("logprobs", f"at most {MAX_LOGPROBS}, got {value}")
        return value
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad("logprobs", f"expected a boolean (chat), got {wanted!r}: the count goes in top_logprobs")
    top = _int(body, "top_logprobs", minimum=0)
    if top is not None and top > MAX_LOGPROBS:
        raise bad("top_logprobs", f"at most {MAX_LOGPROBS}, got {top}")
    if top is not None and not wanted:
        raise bad("top_logprobs", "needs \"logprobs\": true")
    return (top or 0) if wanted else None

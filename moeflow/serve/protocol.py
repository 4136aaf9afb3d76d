"""The OpenAI request bodies moeflow serves: parsed and checked into plain records, or an APIError naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Parameters of the OpenAI API that moeflow does not implement: a request that sets one to
# anything but its neutral value is refused, never silently ignored.
_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None,), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None,),
}


class APIError(Exception):
    """An error sent as the OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class CompletionRequest:
    """One /v1/completions or /v1/chat/completions request, checked."""

    chat: bool
    model: str | None
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, Any]] | None  # chat
    max_tokens: int | None  # None: up to the model's context
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


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


def _prompt(value: object) -> str | list[int]:
    """A text or a list of token ids; a list holding one of those is that prompt. Several
    prompts in one request are refused: each would need its own choices and usage."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        return _prompt(value[0])
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str | list) for v in value):
        raise bad("prompt", f"{len(value)} prompts in one request are not supported: send one request per prompt")
    raise bad("prompt", "expected a string or a non-empty list of token ids")


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
    prompt: str | list[int] | None = None
    messages = None
    if chat:
        if "messages" not in body:
            raise bad("messages", "missing: a chat completion needs messages")
        messages = _messages(body["messages"])
    else:
        if body.get("prompt") is None:
            raise bad("prompt", "missing: a completion needs a prompt")
        prompt = _prompt(body["prompt"])
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
        chat=chat, model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,  # the OpenAI default
        top_p=_float(body, "top_p", 0.0, 1.0, lo_open=True), top_k=_top_k(body),
        seed=_int(body, "seed"), stop=_stop(body.get("stop")), n=_int(body, "n", minimum=1) or 1,
        stream=stream, include_usage=bool(options and options.get("include_usage")),
    )

"""Tool calling in chat: the request's tools and tool_choice checked, tool-call history made ready for the
template, and the model's output parsed into tool calls (Hermes/Qwen and Mistral formats, as vLLM's parsers do)."""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from moeflow.serve.api_error import bad


@dataclass(frozen=True)
class Tools:
    """The functions a chat request offers (OpenAI's {"type": "function", "function": {...}} objects,
    handed to the template as they came) and the tool_choice: "none", "auto", or a function name."""

    specs: tuple[dict[str, Any], ...]
    choice: str  # "none" | "auto" | "function"
    function: str | None = None  # the named function of tool_choice {"type": "function", ...}
    parallel: bool = True


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The request's tools, or None when it offers none; APIError(400) naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", f"expected a boolean, got {parallel!r}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad("tool_choice", f"{choice!r} needs tools: the request offers none")
        return None
    if not isinstance(tools, list):
        raise bad("tools", f"expected a list of {{\"type\": \"function\", \"function\": {{...}}}}, got {type(tools).__name__}")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad(f"tools[{i}]", "expected {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"tools[{i}].function.name", "expected a non-empty string")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON Schema object")
        names.append(function["name"])
    if choice is None or choice in ("auto", "none"):
        return Tools(tuple(tools), choice or "auto", parallel=parallel)
    if choice == "required":
        # vLLM forces a call with guided decoding; moeflow has none, so it could not keep the promise
        raise bad("tool_choice", "\"required\" is not supported: moeflow has no constrained decoding to force a "
                                 "tool call; use \"auto\" or name the function")
    if (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        if name not in names:
            raise bad("tool_choice", f"function {name!r} is not among the tools: {names}")
        return Tools(tuple(tools), "function", name, parallel)
    raise bad("tool_choice", f"expected \"none\", \"auto\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                             f"got {choice!r}")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: an assistant's tool_calls carry their arguments as
    objects, not JSON text (what transformers documents and vLLM hands templates); checked here."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if m.get("role") == "tool" and m.get("content") is None:
            raise bad(f"messages[{i}].content", "a tool message needs content: the tool's result")
        if calls is None:
            out.append(m)
            continue
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise bad(f"messages[{i}].tool_calls", "only an assistant message has tool_calls, a list")
        converted = []
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise bad(where, "expected {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except ValueError as e:
                    raise bad(f"{where}.function.arguments", f"not valid JSON ({e}): {arguments[:60]!r}") from None
            converted.append({**call, "function": {**function, "arguments": arguments}})
        out.append({**m, "tool_calls": converted})
    return out


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the API returns it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolParser:
    """One output format: `opener` starts the tool calls; parse() splits a whole output into the
    content before them and the calls ([] when the output holds none, or none that parse: then
    the whole text is content, as vLLM's parsers return it)."""

    name = ""
    opener = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def new_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call(parser: ToolParser, obj: object) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"not a {{name, arguments}} object: {obj!r:.60}")
    return ToolCall(parser.new_id(), obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))


class HermesParser(ToolParser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    opener = "<tool_call>"
    _blocks = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.opener not in text:
            return text, []
        try:
            calls = [_call(self, json.loads((closed or open_).strip())) for closed, open_ in self._blocks.findall(text)]
        except ValueError:
            return text, []
        content = text[: text.find(self.opener)]
        return content or None, calls


class MistralParser(ToolParser):
    """[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] (Mistral 7B v0.3, Mixtral 8x22B); ids
    are 9 letters and digits, which Mistral's templates check when the history comes back."""

    name = "mistral"
    opener = "[TOOL_CALLS]"
    _array = re.compile(r"\[\s*{.*}\s*\]", re.DOTALL)

    def new_id(self) -> str:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.opener not in text:
            return text, []
        body = text.replace(self.opener, "").strip()
        try:
            try:
                calls = json.loads(body)
            except ValueError:
                found = self._array.search(body)
                if found is None:
                    return text, []
                calls = json.loads(found.group(0))
            parsed = [_call(self, c) for c in (calls if isinstance(calls, list) else [calls])]
        except ValueError:
            return text, []
        content = text.split(self.opener)[0]
        return content or None, parsed


def special_marker(tokenizer: Tokenizer, parser: ToolParser) -> tuple[int, str] | None:
    """(id, text) of the parser's opener when the tokenizer holds it as a special token, which
    decoding drops (Mistral v3 tokenizers' [TOOL_CALLS]); None when it is ordinary text."""
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if added.content == parser.opener and added.special:
            return token_id, added.content
    return None


def parser_for(template_source: str) -> ToolParser | None:
    """The output format a template teaches its model, read from the template's text (vLLM names it
    with --tool-call-parser; the template says the same thing)."""
    if "<tool_call>" in template_source:
        return HermesParser()
    if "[TOOL_CALLS]" in template_source:
        return MistralParser()
    return None


class ToolCallStream:
    """Streamed text with tool calls held back: content flows until the parser's opener appears
    (text that may begin it waits); from there all text is kept and parsed once the output ends."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self._held = ""
        self._in_calls = False

    def push(self, delta: str) -> str:
        """The content that may be shown now."""
        self.text += delta
        if self._in_calls:
            return ""
        buf = self._held + delta
        at = buf.find(self.parser.opener)
        if at >= 0:
            self._in_calls, self._held = True, buf[at:]
            return buf[:at]
        opener = self.parser.opener
        keep = max((k for k in range(1, len(opener)) if buf.endswith(opener[:k])), default=0)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to show, the tool calls): held text is content unless it parsed as calls."""
        _, calls = self.parser.parse(self.text)
        if calls:
            return "", calls
        rest, self._held = self._held, ""
        return rest, []

"""How one choice reaches the client: its text (tool calls held back and parsed in chat), its logprobs in the
endpoint's shape, as a whole response choice or as the bodies of stream chunks."""

from __future__ import annotations

import json
from typing import Any

from moeflow.serve.choices import Choice, Piece
from moeflow.serve.logprobs import TokenText, chat_logprobs, completion_logprobs
from moeflow.serve.tools import ToolCall, ToolCallStream, ToolParser


class ToolUse:
    """What a chat request does with tool calls: parse them from the output ("auto"), or, with a named
    function, read the output as that function's arguments after a forced opening (`prefix`)."""

    def __init__(self, parser: ToolParser, function: str | None = None, parallel: bool = True,
                 marker: tuple[int, str] | None = None) -> None:
        self.parser = parser
        self.function = function
        self.parallel = parallel  # False: at most one call (parallel_tool_calls: false)
        self.marker = marker  # the opener as a special token (id, text), which decoding would drop

    @property
    def prefix(self) -> str:
        """Text appended to the prompt so the model writes the named function's arguments next."""
        if self.function is None:
            return ""
        opening = '{"name": ' + json.dumps(self.function, ensure_ascii=False) + ', "arguments": '
        return f"{self.parser.opener}\n{opening}" if self.parser.name == "hermes" else f"{self.parser.opener} [{opening}"

    @property
    def stop(self) -> tuple[str, ...]:
        return ("</tool_call>",) if self.function is not None and self.parser.name == "hermes" else ()

    def forced_call(self, text: str) -> ToolCall:
        """The named function's call from the output: the JSON object it starts with, or, when it does not
        start with one, the text as it came (the OpenAI API warns arguments may not be valid JSON)."""
        body = text.strip()
        try:
            arguments, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            arguments = None
        arguments_text = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else body
        assert self.function is not None
        return ToolCall(self.parser.new_id(), self.function, arguments_text)


class ChoiceView:
    """One choice's client-facing state: `add` each piece (it returns the stream body to send, if any),
    then `ending` (the stream's last bodies) or `whole` (the response's choice)."""

    def __init__(self, choice: Choice, *, chat: bool, token_text: TokenText | None, tools: ToolUse | None,
                 whole_only: bool = False) -> None:
        self.choice = choice
        self.whole_only = whole_only  # a response, not a stream: `add` only keeps the pieces
        self.chat = chat
        self.token_text = token_text  # None: no logprobs asked for
        self.tools = tools
        self._held = ToolCallStream(tools.parser) if tools is not None and tools.function is None else None
        self._offset = 0  # completions: characters before the next token's text
        self._entries: list[Any] = []

    def _logprobs(self, entries: list[Any] | tuple[Any, ...]) -> dict[str, Any] | None:
        if self.token_text is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        out, self._offset = completion_logprobs(entries, self.token_text, self._offset)
        return out

    def _body(self, text: str | None, logprobs: dict[str, Any] | None, finish: str | None,
              delta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            if delta is None:
                delta = {} if text is None else {"content": text}
            return {"index": self.choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": self.choice.index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def role(self) -> dict[str, Any]:
        return self._body(None, None, None, {"role": "assistant", "content": ""})

    def add(self, piece: Piece) -> dict[str, Any] | None:
        """The stream body for `piece`, if it shows anything; the piece is kept for `whole` either way."""
        self._entries.extend(piece.logprobs)
        if self.whole_only:
            return None
        text = piece.text
        if self.tools is not None:
            text = "" if self._held is None else self._held.push(text)  # a named call's output is its arguments
        if not text and not piece.logprobs:
            return None
        return self._body(text, self._logprobs(piece.logprobs), None)

    def _calls(self) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of the whole output."""
        text = "".join(self.choice.text)
        if self.tools is None:
            return text, []
        if self.tools.function is not None:
            return None, [self.tools.forced_call(text)]
        content, calls = self.tools.parser.parse(text)
        return (content, calls if self.tools.parallel else calls[:1]) if calls else (text, [])

    def _finish(self, calls: list[ToolCall]) -> str | None:
        auto = self.tools is not None and self.tools.function is None
        return "tool_calls" if calls and auto else self.choice.finish_reason

    def ending(self) -> list[dict[str, Any]]:
        """The stream's last bodies: content still held, the tool calls, the finish reason."""
        out = []
        calls: list[ToolCall] = []
        if self._held is not None:
            rest, calls = self._held.finish()
            calls = calls if self.tools is None or self.tools.parallel else calls[:1]
            if rest:
                out.append(self._body(rest, None, None))
        elif self.tools is not None:
            calls = self._calls()[1]
        if calls:
            deltas = [{"index": i, **call.as_dict()} for i, call in enumerate(calls)]
            out.append(self._body(None, None, None, {"tool_calls": deltas}))
        out.append(self._body(None, None, self._finish(calls)))
        return out

    def whole(self) -> dict[str, Any]:
        content, calls = self._calls()
        logprobs = self._logprobs(self._entries)
        if not self.chat:
            return {"index": self.choice.index, "text": content, "logprobs": logprobs,
                    "finish_reason": self.choice.finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.as_dict() for call in calls]
        return {"index": self.choice.index, "message": message, "logprobs": logprobs,
                "finish_reason": self._finish(calls)}

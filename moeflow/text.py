"""Generated tokens to the text a caller sees: incremental detokenization and stop strings
(used by Engine.stream_steps / stream_text / generate and by the server)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class _Detokenizer:
    """Text deltas of a growing id list that never split a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers < 0.21: decode the whole list and diff
            self._stream = None
        else:
            self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        if self._stream is not None:
            delta = self._stream.step(self.tokenizer, token) or ""
        else:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character still missing its later bytes
                return ""
            delta = text[len(self._emitted):]
        self._emitted += delta
        return delta

    def flush(self) -> str:
        """Once no token follows: bytes still held (a character never completed) come out as
        U+FFFD, so the whole stream reads as the full list decodes."""
        if not self._ids:
            return ""
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        return text[len(self._emitted):] if text.startswith(self._emitted) else ""


class TextStream:
    """Tokens in, text out, cut before the first stop string: `push` returns what may be shown
    now. Text that could be the start of a stop string is held back until it cannot be."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = _Detokenizer(tokenizer)
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""
        self.text = ""  # everything released so far (the request's text once flushed)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        out = self._release(self._detok.push(token))
        self.text += out
        return out

    def flush(self) -> str:
        """What is left once no more tokens come: held text, and bytes of a character never
        completed (as U+FFFD, the way the whole list decodes)."""
        if self.stopped:
            return ""
        out = self._release(self._detok.flush())
        if not self.stopped:
            out, self._held = out + self._held, ""
        self.text += out
        return out

    def _release(self, delta: str) -> str:
        self._held += delta
        if not self.stop:
            out, self._held = self._held, ""
            return out
        cut = min((i for s in self.stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self._held.endswith(s[:k])), default=0)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

"""Generated tokens to the text a client sees: incremental detokenization and stop strings."""

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
        if self._stream is not None:
            return self._stream.step(self.tokenizer, token) or ""
        self._ids.append(token)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character still missing its later bytes
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta


class TextStream:
    """Tokens in, text out, cut before the first stop string: `push` returns what may be shown
    now. Text that could be the start of a stop string is held back until it cannot be."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._detok = _Detokenizer(tokenizer)
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._held += self._detok.push(token)
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

    def flush(self) -> str:
        """The text held back once no more tokens come."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

"""Token log-probabilities in the API's two shapes: completions' legacy lists (tokens, token_logprobs,
top_logprobs, text_offset) and chat's content entries ({token, logprob, bytes, top_logprobs})."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders

LOGPROB_FLOOR = -9999.0  # vLLM's clamp: -inf is not JSON


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted: a byte-level token's text back to its bytes."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


class TokenText:
    """What a token id looks like to a client: its text (decoded alone, special tokens shown, as vLLM
    returns it) and its bytes (a byte-level token's real bytes, so a character split across tokens
    can be put back together; otherwise the UTF-8 of its text)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes_of = _byte_level_table() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        known = self._cache.get(token)
        if known is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = list(text.encode("utf-8"))
            piece = self.tokenizer.id_to_token(token)
            if self._bytes_of is not None and piece is not None and all(c in self._bytes_of for c in piece):
                raw = [self._bytes_of[c] for c in piece]
            known = self._cache[token] = (text, raw)
        return known


def _logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


def completion_logprobs(entries: Sequence[Any], token_text: TokenText, offset: int) -> tuple[dict[str, Any], int]:
    """The legacy `logprobs` object of `entries` (TokenLogprob) whose text starts at character
    `offset` of the choice, and the offset after them. top_logprobs holds the chosen token, then
    the k most likely (vLLM's form; a dict, so tokens of equal text share a key)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        text, _ = token_text(entry.token)
        tokens.append(text)
        token_logprobs.append(_logprob(entry.logprob))
        alternatives = {text: _logprob(entry.logprob)}
        for token, logprob in entry.top:
            alternatives.setdefault(token_text(token)[0], _logprob(logprob))
        top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


def chat_logprobs(entries: Sequence[Any], token_text: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object of `entries`: {"content": [{token, logprob, bytes, top_logprobs}]},
    top_logprobs holding the k most likely tokens, most likely first."""
    content = []
    for entry in entries:
        text, raw = token_text(entry.token)
        top = []
        for token, logprob in entry.top:
            alt_text, alt_raw = token_text(token)
            top.append({"token": alt_text, "logprob": _logprob(logprob), "bytes": alt_raw})
        content.append({"token": text, "logprob": _logprob(entry.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content}

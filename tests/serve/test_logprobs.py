"""Logprob shapes: completions' legacy lists with text offsets, chat's entries whose bytes rebuild split characters."""

from __future__ import annotations

import math
from pathlib import Path

from tokenizers import Tokenizer

from moeflow.runtime.sampling import TokenLogprob
from moeflow.serve.logprobs import LOGPROB_FLOOR, TokenText, chat_logprobs, completion_logprobs


def _tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def test_bytes_of_byte_level_tokens_rebuild_characters_split_across_them(tiny_model: Path) -> None:
    tok = _tokenizer(tiny_model)
    text = "x = '日本語 ✓ ü'"
    ids = tok.encode(text, add_special_tokens=False).ids
    token_text = TokenText(tok)
    pieces = [token_text(i) for i in ids]
    assert any("\ufffd" in t for t, _ in pieces)  # some token holds part of a character: its text cannot show it
    assert bytes(b for _, raw in pieces for b in raw).decode("utf-8") == text  # its bytes can


def test_completion_logprobs_list_tokens_offsets_and_alternatives(tiny_model: Path) -> None:
    tok = _tokenizer(tiny_model)
    ids = tok.encode("def f(x): return x", add_special_tokens=False).ids[:4]
    entries = [TokenLogprob(i, -0.5 * k, [(i, -0.5 * k), (ids[0], -7.0)]) for k, i in enumerate(ids)]
    token_text = TokenText(tok)
    first, offset = completion_logprobs(entries[:2], token_text, 0)
    second, end = completion_logprobs(entries[2:], token_text, offset)  # a stream's next chunk goes on counting
    texts = [token_text(i)[0] for i in ids]
    assert first["tokens"] + second["tokens"] == texts
    assert first["text_offset"] + second["text_offset"] == [sum(map(len, texts[:k])) for k in range(4)]
    assert end == len("".join(texts))
    assert first["token_logprobs"] == [0.0, -0.5]
    assert first["top_logprobs"][1] == {texts[1]: -0.5, texts[0]: -7.0}  # the chosen token, then the top k


def test_chat_logprobs_entries_and_minus_infinity_floored(tiny_model: Path) -> None:
    tok = _tokenizer(tiny_model)
    a, b = tok.encode("ab cd", add_special_tokens=False).ids[:2]
    out = chat_logprobs([TokenLogprob(a, -math.inf, [(b, -0.1), (a, -math.inf)])], TokenText(tok))
    entry = out["content"][0]
    assert entry["logprob"] == LOGPROB_FLOOR  # JSON has no -inf
    assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([b]), tok.decode([a])]
    assert entry["top_logprobs"][1]["logprob"] == LOGPROB_FLOOR
    assert bytes(entry["bytes"]).decode() == entry["token"]
    assert chat_logprobs([TokenLogprob(a, -1.0)], TokenText(tok))["content"][0]["top_logprobs"] == []

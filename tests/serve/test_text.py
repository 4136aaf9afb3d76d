"""Streamed text: multi-byte characters are never emitted broken, and stop strings cut it exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from moeflow.serve.text import TextStream, _Detokenizer

TEXT = "héllo ✓ 日本語 😀 done"


@pytest.fixture
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _deltas(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    singles = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the text must split a character across tokens to test this"
    deltas = _deltas(TextStream(tokenizer), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT


def test_the_fallback_detokenizer_holds_incomplete_characters_too(tokenizer: Tokenizer) -> None:
    detok = _Detokenizer(tokenizer)
    detok._stream = None  # the path for tokenizers without DecodeStream
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT


@pytest.mark.parametrize("stop", ["日本", "✓ 日", "o ✓", "done", "😀"])
def test_stop_string_cuts_before_it_and_nothing_after_is_emitted(tokenizer: Tokenizer, stop: str) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    stream = TextStream(tokenizer, ["never-there", stop])
    deltas = _deltas(stream, ids)
    assert stream.stopped
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_text_that_only_starts_a_stop_string_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abc don", add_special_tokens=False).ids
    stream = TextStream(tokenizer, ["done"])
    deltas = _deltas(stream, ids)
    assert not stream.stopped
    assert deltas[-1].endswith("don")  # held back while it could have become "done"
    assert "".join(deltas) == "abc don"


@pytest.mark.parametrize("fallback", [False, True])
def test_a_character_never_completed_comes_out_at_the_end_as_the_full_decode_has_it(
    tokenizer: Tokenizer, fallback: bool
) -> None:
    ids = tokenizer.encode("ok 日本", add_special_tokens=False).ids[:-1]  # the last character cut short
    full = tokenizer.decode(ids)
    assert full.endswith("\ufffd")
    stream = TextStream(tokenizer)
    if fallback:
        stream._detok._stream = None
    deltas = _deltas(stream, ids)
    assert all("\ufffd" not in d for d in deltas[:-1])
    assert "".join(deltas) == full

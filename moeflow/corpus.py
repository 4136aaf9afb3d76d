"""An offline text corpus: the Python standard library's own sources (code, comments and docstrings).

Every machine with CPython has it, so tokenizers and small models can be trained with nothing
downloaded. Files are taken in sorted order and split by a hash of their path, which makes the
corpus, and everything trained on it, reproducible for a given Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py") if not (_SKIP_PARTS & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def split_of(path: Path) -> str:
    """'heldout' for about 5% of files (by a hash of the relative path), else 'train'."""
    rel = str(path.relative_to(stdlib_dir())).encode()
    return "heldout" if hashlib.sha256(rel).digest()[0] < 13 else "train"


def documents(split: str = "train", max_bytes: int | None = None) -> Iterator[str]:
    """Source files of one split, in a fixed order, up to `max_bytes` of text in all."""
    total = 0
    for path in stdlib_files():
        if split_of(path) != split:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            if total:
                return
            text = text[:max_bytes]
        total += len(text)
        yield text


def snippets(split: str, count: int, chars: int) -> list[str]:
    """`count` texts: the first `chars` characters of consecutive documents of a split."""
    out = []
    for doc in documents(split):
        text = doc.strip()
        if len(text) >= chars:
            out.append(text[:chars])
        if len(out) == count:
            break
    return out

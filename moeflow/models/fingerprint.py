"""A checkpoint's identity by content: config plus, per safetensors shard, its header and sampled data ranges.

Reading whole multi-GB shards at every open is too slow, so each shard contributes its size, its raw
header and a fixed number of fixed-size ranges spread evenly over its tensor data (the whole data
region when it is smaller than the samples). Paths and modification times are left out on purpose:
a copied checkpoint with the same bytes has the same fingerprint. A change outside every sampled
range can be missed here; blob checksums are still checked on every load, and `moeflow verify`
compares every expert with the checkpoint in full.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash

from moeflow.errors import CheckpointError

KIND = "xxh3-128/s16x64k"  # names the scheme: a store made under another scheme is stale, not reused
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


def sample_ranges(data_start: int, size: int, samples: int = SAMPLES, sample_bytes: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """(start, end) byte ranges of a shard to hash: the first and last bytes of its data and evenly between."""
    span = size - data_start
    if span <= samples * sample_bytes:
        return [(data_start, size)] if span > 0 else []
    step = (span - sample_bytes) / (samples - 1)
    return [(data_start + int(i * step), data_start + int(i * step) + sample_bytes) for i in range(samples)]


def shard_digest(path: Path, samples: int = SAMPLES, sample_bytes: int = SAMPLE_BYTES) -> str:
    """Hash of one safetensors shard: size, raw header, sampled data ranges."""
    h = xxhash.xxh3_128()
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)", path=str(path))
            (header_len,) = struct.unpack("<Q", raw_len)
            data_start = min(8 + header_len, size)
            h.update(f"{size}:".encode())
            h.update(f.read(data_start - 8))
            for start, end in sample_ranges(data_start, size, samples, sample_bytes):
                f.seek(start)
                chunk = f.read(end - start)
                if len(chunk) != end - start:
                    raise CheckpointError(f"{path}: file shrank while it was read", path=str(path))
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", path=str(path)) from e
    return h.hexdigest()


def checkpoint_fingerprint(config: dict[str, Any], root: Path, files: Sequence[Path]) -> str:
    """Fingerprint of a checkpoint: its config and every shard's digest, keyed by the shard's name in `root`."""
    h = xxhash.xxh3_128()
    h.update(json.dumps(config, sort_keys=True).encode())
    for file in files:
        h.update(f"\0{file.relative_to(root).as_posix()}\0".encode())
        h.update(shard_digest(file).encode())
    return f"{KIND}:{h.hexdigest()}"

"""The expert store: blob layout, checksums, reuse, staleness and atomic conversion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeflow import _core
from moeflow.errors import StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import ExpertStore, codec_for, convert, open_or_convert
from moeflow.store.codecs import DenseCodec
from moeflow.store.layout import BLOB_ALIGN


@pytest.fixture
def model(hf_checkpoints, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("qwen2_moe")
    ckpt = Checkpoint(path)
    return ckpt, parse_arch(ckpt), tmp_path / "stores"


def test_blobs_are_aligned_checksummed_and_hold_the_experts(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    store = convert(ckpt, arch, codec_for("float32"), root, progress=False)
    assert store.blob_size % BLOB_ALIGN == 0
    data = store.data_path.read_bytes()
    assert len(data) == store.blob_size * len(arch.moe_layers) * arch.num_experts
    for layer in arch.moe_layers:
        for e in range(arch.num_experts):
            off = store.offset(layer, e)
            blob = data[off : off + store.blob_size]
            assert _core.crc32(blob) == store.crc32(layer, e)
            views = store.layout.views(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            gate, up, down = (ckpt.get(n) for n in arch.naming.expert(layer, e))
            assert torch.equal(views["gate_up"], torch.cat([gate, up]))
            assert torch.equal(views["down"], down)


def test_valid_store_is_reused_and_stale_one_rebuilt(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    first = open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    mtime = first.data_path.stat().st_mtime_ns
    again = open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    assert again.data_path.stat().st_mtime_ns == mtime  # reused, not rewritten
    manifest = json.loads((first.path / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 64
    (first.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="stale store"):
        open_or_convert(ckpt, arch, codec_for("float32"), root, mode="never", progress=False)
    rebuilt = open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    assert rebuilt.manifest.fingerprint == ckpt.fingerprint()


def test_corrupt_manifest_is_refused_not_used(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    store = convert(ckpt, arch, codec_for("float32"), root, progress=False)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt manifest"):
        ExpertStore.open(store.path, ckpt.fingerprint())


class _FailingCodec(DenseCodec):
    def __init__(self, fail_after: int) -> None:
        super().__init__(torch.float32)
        object.__setattr__(self, "calls", 0)
        object.__setattr__(self, "fail_after", fail_after)

    def encode(self, gate, up, down):  # type: ignore[no-untyped-def]
        object.__setattr__(self, "calls", self.calls + 1)
        if self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted")
        return super().encode(gate, up, down)


def test_interrupted_conversion_leaves_no_store_and_no_leftovers(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, arch, _FailingCodec(3), root, progress=False)
    assert not (root / "float32").exists()
    assert list(root.iterdir()) == []


def test_killed_conversion_never_looks_valid_and_is_cleaned_up(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    script = f"""
import time, torch
from moeflow.models import Checkpoint, parse_arch
from moeflow.store.codecs import DenseCodec
from moeflow.store import convert
class Slow(DenseCodec):
    def encode(self, g, u, d):
        time.sleep(0.2)
        return super().encode(g, u, d)
ck = Checkpoint({str(ckpt.path)!r})
convert(ck, parse_arch(ck), Slow(torch.float32), __import__('pathlib').Path({str(root)!r}), progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-") for p in (root.iterdir() if root.exists() else [])):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(StoreError):
        ExpertStore.open(root / "float32", ckpt.fingerprint())
    store = open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    assert store.manifest.fingerprint == ckpt.fingerprint()
    assert [p.name for p in root.iterdir()] == ["float32"]

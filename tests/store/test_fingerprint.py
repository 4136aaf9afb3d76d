"""The store knows its checkpoint by content: same-size weight swaps are caught, identical copies reuse the store."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from moeflow.errors import StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.models.fingerprint import SAMPLE_BYTES, SAMPLES, sample_ranges, shard_digest
from moeflow.store import codec_for, open_or_convert, store_spec
from moeflow.store.convert import encode_blob


def _copy(src: Path, dst: Path, *, keep_times: bool) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2 if keep_times else shutil.copy,
                    ignore=shutil.ignore_patterns(".moeflow"))
    return dst


def _store_matches(ckpt: Checkpoint, root: Path) -> bool:
    arch, codec = parse_arch(ckpt), codec_for("float32")
    store = open_or_convert(ckpt, arch, codec, root, progress=False)
    data = store.data_path.read_bytes()
    layout = store_spec(arch, codec).layout
    return all(
        data[store.offset(layer, e) : store.offset(layer, e) + store.blob_size]
        == encode_blob(ckpt, arch, codec, layout, layer, e).tobytes()
        for layer in arch.moe_layers
        for e in range(arch.num_experts)
    )


def test_same_size_weights_with_restored_mtime_are_detected_and_rebuilt(hf_checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.hf_models import save_tiny

    model = _copy(hf_checkpoints.path("mixtral"), tmp_path / "model", keep_times=True)
    other = save_tiny("mixtral", tmp_path / "other", seed=1)  # same shapes, other values
    ckpt = Checkpoint(model)
    arch, codec = parse_arch(ckpt), codec_for("float32")
    store = open_or_convert(ckpt, arch, codec, model / ".moeflow", progress=False)
    old_print = store.manifest.fingerprint
    shard = model / "model.safetensors"
    st = shard.stat()
    assert (other / "model.safetensors").stat().st_size == st.st_size
    shutil.copyfile(other / "model.safetensors", shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns
    swapped = Checkpoint(model)
    assert swapped.fingerprint() != old_print
    with pytest.raises(StoreError, match="stale store"):
        open_or_convert(swapped, arch, codec, model / ".moeflow", mode="never", progress=False)
    assert _store_matches(swapped, model / ".moeflow")  # auto: rebuilt from the new weights


@pytest.mark.parametrize("keep_times", [True, False])
def test_copied_checkpoint_with_identical_content_reuses_the_store(hf_checkpoints, tmp_path: Path, keep_times: bool) -> None:  # type: ignore[no-untyped-def]
    first = _copy(hf_checkpoints.path("qwen2_moe"), tmp_path / "a", keep_times=True)
    time.sleep(0.01)  # so a rewritten store would get another mtime
    second = _copy(first, tmp_path / "elsewhere" / "b", keep_times=keep_times)
    shared = tmp_path / "stores"
    a, b = Checkpoint(first), Checkpoint(second)
    assert a.fingerprint() == b.fingerprint()
    arch, codec = parse_arch(a), codec_for("float32")
    built = open_or_convert(a, arch, codec, shared, progress=False)
    mtime = built.data_path.stat().st_mtime_ns
    reused = open_or_convert(b, arch, codec, shared, mode="never", progress=False)
    assert reused.data_path.stat().st_mtime_ns == mtime


def test_store_inside_a_copied_folder_is_reused(hf_checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = _copy(hf_checkpoints.path("qwen2_moe"), tmp_path / "a", keep_times=True)
    a = Checkpoint(first)
    arch, codec = parse_arch(a), codec_for("float32")
    open_or_convert(a, arch, codec, first / ".moeflow", progress=False)
    second = tmp_path / "b"
    shutil.copytree(first, second)  # cp -a: the store travels with the checkpoint
    b = Checkpoint(second)
    open_or_convert(b, arch, codec, second / ".moeflow", mode="never", progress=False)


def test_samples_span_the_data_and_are_bounded() -> None:
    size = 10 << 30
    ranges = sample_ranges(4096, size)
    assert len(ranges) == SAMPLES
    assert ranges[0][0] == 4096 and ranges[-1][1] == size
    assert all(end - start == SAMPLE_BYTES for start, end in ranges)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert sample_ranges(100, 100 + SAMPLES * SAMPLE_BYTES) == [(100, 100 + SAMPLES * SAMPLE_BYTES)]  # small: whole


def _sparse_shard(path: Path, size: int) -> int:
    header = json.dumps({"w": {"dtype": "U8", "shape": [size - 4096], "data_offsets": [0, size - 4096]}}).encode()
    header += b" " * (4096 - 8 - len(header))
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(size)
    return 4096


def test_fingerprint_reads_samples_not_the_whole_shard(tmp_path: Path) -> None:
    shard = tmp_path / "model.safetensors"
    data_start = _sparse_shard(shard, 32 << 30)  # 32 GiB, sparse: a full read would take many seconds
    started = time.perf_counter()
    before = shard_digest(shard)
    assert time.perf_counter() - started < 2.0
    start, _ = sample_ranges(data_start, 32 << 30)[7]
    with shard.open("r+b") as f:  # a change inside a sampled range, same size
        f.seek(start + 5)
        f.write(b"\x01")
    assert shard_digest(shard) != before


def test_fingerprint_ignores_paths_and_times_but_not_the_config(hf_checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = hf_checkpoints.path("olmoe")
    a = _copy(src, tmp_path / "a", keep_times=False)
    os.utime(a / "model.safetensors", (1, 1))
    assert Checkpoint(a).fingerprint() == Checkpoint(src).fingerprint()
    cfg = json.loads((a / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (a / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint(a).fingerprint() != Checkpoint(src).fingerprint()

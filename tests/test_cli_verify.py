"""`moeflow verify MODEL`: every blob's checksum against the manifest and its bytes against the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moeflow import _core
from moeflow.cli import main


@pytest.fixture
def model(hf_checkpoints, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("mixtral"), dst, ignore=shutil.ignore_patterns(".moeflow"))
    assert main(["convert", str(dst), "--precision", "float32,int8-g16"]) == 0
    return dst


def _blob(model: Path, precision: str, index: int) -> tuple[Path, int, int]:
    manifest = json.loads((model / ".moeflow" / precision / "manifest.json").read_text())
    size = manifest["layout"]["size"]
    return model / ".moeflow" / precision / "experts.bin", index * size, size


def test_verify_passes_a_fresh_store_of_every_precision(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(model)]) == 0
    out = capsys.readouterr().out
    assert "(float32): 12 blobs checked: OK" in out and "(int8-g16): 12 blobs checked: OK" in out


def test_verify_reports_a_flipped_byte_with_the_time_restored(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, offset, _ = _blob(model, "float32", 7)  # layer 1, expert 1 of 6
    st = data.stat()
    with data.open("r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["verify", str(model), "--precision", "float32"]) == 1
    captured = capsys.readouterr()
    assert "layer 1 expert 1: checksum differs from the manifest" in captured.out
    assert "layer 1 expert 1: bytes differ from the checkpoint" in captured.out
    assert "MISMATCH" in captured.out and "--force" in captured.err


def test_verify_compares_with_the_checkpoint_not_only_the_checksums(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A blob rewritten together with its manifest checksum passes every load check; verify still sees it."""
    data, offset, size = _blob(model, "float32", 2)
    mpath = model / ".moeflow" / "float32" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    st = data.stat()
    with data.open("r+b") as f:
        f.seek(offset)
        blob = bytearray(f.read(size))
        blob[0:4] = b"\x00\x00\x80\x3f"  # 1.0f
        f.seek(offset)
        f.write(blob)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    manifest["crc32"][2] = _core.crc32(bytes(blob))
    mpath.write_text(json.dumps(manifest))
    assert main(["verify", str(model), "--precision", "float32"]) == 1
    out = capsys.readouterr().out
    assert "layer 0 expert 2: bytes differ from the checkpoint" in out
    assert "checksum differs" not in out


def test_verify_reports_changed_weights(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.hf_models import save_tiny

    other = save_tiny("mixtral", tmp_path / "other", seed=3)
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    assert main(["verify", str(model), "--precision", "float32"]) == 1
    out = capsys.readouterr().out
    assert "fingerprint differs" in out and "bytes differ from the checkpoint" in out


def test_verify_without_a_store_or_with_a_corrupt_manifest_is_an_error(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(model), "--store-dir", str(tmp_path / "none")]) == 1
    assert "no expert store" in capsys.readouterr().err
    (model / ".moeflow" / "float32" / "manifest.json").write_text("[]")
    assert main(["verify", str(model), "--precision", "float32"]) == 1
    assert "expected a JSON object" in capsys.readouterr().err

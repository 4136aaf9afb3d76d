"""Where a store goes when the checkpoint's folder is not the place (read-only, hub cache), and the disk-space check."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from moeflow import Engine
from moeflow.errors import StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import codec_for, open_or_convert, resolve_store_root
from tests.store.test_store_faults import read_only

conv = importlib.import_module("moeflow.store.convert")  # the module (moeflow.store exports a function of that name)


def _low_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> list[Path]:
    """shutil.disk_usage, as convert calls it, reports `free` bytes; returns the paths it was asked about."""
    asked: list[Path] = []
    real = shutil.disk_usage

    def fake(path: Any) -> Any:
        asked.append(Path(path))
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(conv.shutil, "disk_usage", fake)
    return asked


def test_conversion_checks_free_space_first_and_writes_nothing(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = Checkpoint(hf_checkpoints.path("qwen2_moe"))
    arch, codec = parse_arch(ckpt), codec_for("float32")
    root = tmp_path / "new" / "stores"
    asked = _low_disk(monkeypatch, 4096)
    with pytest.raises(StoreError) as err:
        open_or_convert(ckpt, arch, codec, root, progress=False)
    needed = conv._needed_bytes(conv.store_spec(arch, codec).layout, len(arch.moe_layers) * arch.num_experts)
    text = str(err.value)
    assert f"needs {needed} bytes" in text and "4096 bytes" in text and str(root) in text
    assert f"disk holding {tmp_path}" in text and "store_dir" in text
    assert asked and asked[0] == tmp_path  # the nearest folder that exists: root is not made first
    assert not (tmp_path / "new").exists()  # nothing written, not even the folder or its lock
    ckpt.close()


def test_enough_free_space_converts(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    ckpt = Checkpoint(hf_checkpoints.path("qwen2_moe"))
    arch, codec = parse_arch(ckpt), codec_for("float32")
    needed = conv._needed_bytes(conv.store_spec(arch, codec).layout, len(arch.moe_layers) * arch.num_experts)
    _low_disk(monkeypatch, needed)  # exactly enough
    store = open_or_convert(ckpt, arch, codec, tmp_path / "stores", progress=False)
    assert store.path.parent == tmp_path / "stores"
    ckpt.close()


@pytest.mark.asyncio
async def test_engine_open_on_a_full_disk_is_a_store_error(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _low_disk(monkeypatch, 0)
    with pytest.raises(StoreError, match=r"not enough disk space.*needs \d+ bytes.*0 bytes \(0.0 MiB\) are free"):
        await Engine.open(hf_checkpoints.path("mixtral"), device="cpu", store_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_read_only_copies_of_the_same_weights_share_one_cached_store(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "cache"))
    roots = []
    for name in ("a", "b"):
        model = tmp_path / name / "model"
        shutil.copytree(hf_checkpoints.path("qwen2_moe"), model, ignore=shutil.ignore_patterns(".moeflow"))
        ckpt = Checkpoint(model)
        with read_only(model):
            roots.append(resolve_store_root(model, None, identity=ckpt.fingerprint).root)
        ckpt.close()
    assert roots[0] == roots[1] and roots[0].parent == tmp_path / "cache"
    assert roots[0].name.startswith("model-")


def test_every_caller_finds_the_same_cached_store_of_a_read_only_checkpoint(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """`moeflow convert` (store_root, no identity given) and the engine (its checkpoint's fingerprint) agree."""
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("qwen2_moe"), model, ignore=shutil.ignore_patterns(".moeflow"))
    ckpt = Checkpoint(model)
    with read_only(model):
        assert resolve_store_root(model, None).root == resolve_store_root(model, None, identity=ckpt.fingerprint).root
    ckpt.close()

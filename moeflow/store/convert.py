"""Converting a checkpoint's experts into a store: aligned blobs, checksums, atomic publish."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeflow import _core
from moeflow.errors import StoreError
from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.tensors import HubTensor, expert_tensors
from moeflow.store.codecs import Codec
from moeflow.store.layout import BlobLayout
from moeflow.store.store import DATA, MANIFEST, ExpertStore, Manifest

_TMP_PREFIX = ".tmp-"


def _blob_bytes(layout: BlobLayout, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    blob = np.zeros(layout.size, dtype=np.uint8)
    for slot in layout.slots:
        t = tensors[slot.name].contiguous()
        if tuple(t.shape) != slot.shape:
            raise StoreError(f"encoded {slot.name} has shape {list(t.shape)}, layout says {list(slot.shape)}")
        raw = t.view(torch.uint8).reshape(-1).numpy()
        blob[slot.offset : slot.offset + raw.size] = raw
    return blob


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale_tmp(root: Path) -> None:
    """Remove leftovers of interrupted conversions whose process is gone."""
    if not root.is_dir():
        return
    for tmp in root.glob(f"{_TMP_PREFIX}*"):
        pid = tmp.name.split("-")[-2] if tmp.name.count("-") >= 3 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert(ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, *, progress: bool = True) -> ExpertStore:
    """Write every expert of `ckpt` into `root/<precision>` and return the opened store.

    The store is built in a temporary directory, fsynced and renamed into place, so an
    interrupted conversion never leaves something that looks like a valid store.
    """
    layout = codec.layout(arch.hidden_size, arch.expert_intermediate)
    final = root / layout.precision
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root)
    tmp = root / f"{_TMP_PREFIX}{layout.precision}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write(ckpt, arch, codec, layout, tmp, progress)
        if final.exists():
            trash = root / f"{_TMP_PREFIX}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExpertStore(final, manifest)


def _write(ckpt: Checkpoint, arch: Arch, codec: Codec, layout: BlobLayout, tmp: Path, progress: bool) -> Manifest:
    layers = arch.moe_layers
    total = len(layers) * arch.num_experts
    data_path = tmp / DATA
    crcs: list[int] = []
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total * layout.size)
        bar = tqdm(total=total, desc=f"converting experts ({layout.precision})", unit="expert", disable=not progress)
        with bar:
            index = 0
            for layer in layers:
                for expert in range(arch.num_experts):
                    gate, up, down = (_expert_tensor(ckpt, t) for t in expert_tensors(arch, layer, expert).all())
                    blob = _blob_bytes(layout, codec.encode(gate, up, down))
                    raw = memoryview(blob.data)
                    crcs.append(_core.crc32(raw))
                    written = os.pwrite(fd, raw, index * layout.size)
                    if written != layout.size:
                        raise StoreError(f"{data_path}: short write ({written} of {layout.size})", path=str(data_path))
                    index += 1
                    bar.update(1)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = data_path.stat()
    manifest = Manifest(
        fingerprint=ckpt.fingerprint(),
        family=arch.family,
        layout=layout,
        num_experts=arch.num_experts,
        layers=tuple(layers),
        data_size=st.st_size,
        data_mtime_ns=st.st_mtime_ns,
        crc32=tuple(crcs),
    )
    mpath = tmp / MANIFEST
    with open(mpath, "w") as f:
        json.dump(manifest.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    return manifest


def _expert_tensor(ckpt: Checkpoint, tensor: HubTensor) -> torch.Tensor:
    ckpt.expect_shape(tensor.name, tensor.shape)
    return ckpt.get(tensor.name)


def open_or_convert(
    ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, *, mode: str = "auto", progress: bool = True
) -> ExpertStore:
    """The store of `codec`'s precision: reused when valid, (re)built when `mode` allows.

    mode: 'auto' reuses a valid store and rebuilds a missing, stale or changed one;
    'never' refuses (StoreError) instead of building; 'rebuild' always rebuilds.
    """
    final = root / codec.layout(arch.hidden_size, arch.expert_intermediate).precision
    if mode != "rebuild":
        try:
            return ExpertStore.open(final, ckpt.fingerprint())
        except StoreError:
            if mode == "never":
                raise
    return convert(ckpt, arch, codec, root, progress=progress)

"""Converting a checkpoint's experts into a store: aligned blobs, checksums, atomic publish under the build lock."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeflow import _core
from moeflow.errors import StoreError, UnsupportedModel
from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.tensors import HubTensor, expert_bias_tensors, expert_tensors, read_tensor
from moeflow.store import fp8
from moeflow.store.codecs import Codec
from moeflow.store.fp8 import Fp8Codec
from moeflow.store import mxfp4
from moeflow.store.layout import DTYPES, BlobLayout
from moeflow.store.lock import BuildLock, build_lock
from moeflow.store.manifest import DATA, Manifest, StoreSpec
from moeflow.store.scratch import MARKER, TMP_PREFIX, clean_stale_tmp, make_tmp, remove_tmp
from moeflow.store.store import MANIFEST, ExpertStore

log = logging.getLogger("moeflow.store")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def store_spec(arch: Arch, codec: Codec) -> StoreSpec:
    """What a store of `codec` made from a checkpoint of `arch` must hold."""
    return StoreSpec(
        arch.family, expert_layout(arch, codec), arch.num_experts, tuple(arch.moe_layers)
    )


def expert_layout(arch: Arch, codec: Codec) -> BlobLayout:
    """One expert blob's layout: the codec's, with GPT-OSS's biases and activation."""
    return codec.layout(arch.hidden_size, arch.expert_intermediate, arch.swiglu)


def _blob_bytes(layout: BlobLayout, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    blob = np.zeros(layout.size, dtype=np.uint8)
    for slot in layout.slots:
        t = tensors[slot.name].contiguous()
        if tuple(t.shape) != slot.shape:
            raise StoreError(f"encoded {slot.name} has shape {list(t.shape)}, layout says {list(slot.shape)}")
        raw = t.view(torch.uint8).reshape(-1).numpy()
        blob[slot.offset : slot.offset + raw.size] = raw
    return blob


def encode_blob(ckpt: Checkpoint, arch: Arch, codec: Codec, layout: BlobLayout, layer: int, expert: int) -> np.ndarray:
    """The bytes of one expert's blob, encoded from the checkpoint (what the store must hold)."""
    if mxfp4.is_mxfp4(ckpt.config):  # GPT-OSS's MXFP4 experts: copied, or dequantized for another precision
        return _blob_bytes(layout, mxfp4.encode_expert(ckpt, arch, codec, layout, layer, expert))
    mats = expert_tensors(arch, layer, expert).all()
    tensors = _native_fp8(ckpt, codec, mats)
    if tensors is None:
        gate, up, down = (_expert_tensor(ckpt, t) for t in mats)
        tensors = codec.encode(gate, up, down)
    biases = expert_bias_tensors(arch, layer, expert)
    if biases is not None:  # GPT-OSS: stacked like gate_up, in the blob's (unquantized) dtype
        dtype = DTYPES[layout.slot("gate_up_bias").dtype]  # the codec's: mxfp4 keeps them float32
        b_gate, b_up, b_down = (_expert_tensor(ckpt, t) for t in biases)
        tensors["gate_up_bias"], tensors["down_bias"] = torch.cat([b_gate, b_up]).to(dtype), b_down.to(dtype)
    return _blob_bytes(layout, tensors)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (every store write goes through here: tests inject faults)."""
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        done += n


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (the disk a folder not made yet will be on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(root: Path) -> int:
    return shutil.disk_usage(_existing(root)).free


def _needed_bytes(layout: BlobLayout, blobs: int) -> int:
    # data, plus the manifest (a checksum of up to 11 characters per blob and the layout)
    return blobs * layout.size + blobs * 12 + 64 * 1024


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.1f} MiB)"


def _disk_full(root: Path, what: str, needed: int, free: int | None = None) -> StoreError:
    free = _free_bytes(root) if free is None else free
    return StoreError(
        f"{root}: not enough disk space for the expert store ({what}): it needs {_mib(needed)}, "
        f"{_mib(free)} are free on the disk holding {_existing(root)}; free some space or set store_dir "
        f"to a folder on another disk",
        path=str(root),
    )


def require_space(root: Path, arch: Arch, codec: Codec) -> None:
    """StoreError naming the bytes needed, the bytes free and where, when the disk holding `root`
    cannot take a store of `codec` for `arch`; checked before anything is written (not even `root`)."""
    spec = store_spec(arch, codec)
    needed = _needed_bytes(spec.layout, len(spec.layers) * spec.num_experts)
    free = _free_bytes(root)
    if free < needed:
        raise _disk_full(root, "checked before conversion", needed, free)


def _write_error(root: Path, error: OSError, needed: int) -> StoreError:
    """The typed error of a failed write while building in `root` (after its temporary folder is gone)."""
    name = Path(error.filename).name if error.filename else ""
    if not name or name.startswith(TMP_PREFIX) or name == MARKER:  # gone now: naming it would mislead
        name = "the temporary folder"
    if error.errno in _DISK_FULL:
        return _disk_full(root, f"disk full while writing {name}", needed)
    return StoreError(
        f"{root}: writing the expert store failed ({name}: {error.strerror}); nothing of this build was kept",
        path=str(root),
    )


@contextmanager
def _locked(root: Path) -> Iterator[BuildLock]:
    """The build lock of `root`; a root that cannot be made or written is a StoreError naming store_dir."""
    stack = ExitStack()
    try:
        root.mkdir(parents=True, exist_ok=True)
        held = stack.enter_context(build_lock(root))
    except OSError as e:
        raise StoreError(
            f"{root}: cannot write the expert store there ({e.strerror}); set store_dir to a writable folder",
            path=str(root),
        ) from e
    with stack:
        yield held


def convert(
    ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, *, progress: bool = True,
    cancel: threading.Event | None = None,
) -> ExpertStore:
    """Write every expert of `ckpt` into `root/<precision>` and return the opened store.

    Runs under the root's build lock. The store is built in a marked temporary folder, fsynced
    and renamed into place, so an interrupted conversion never leaves something that looks like
    a valid store, and the folder is removed on any error, Ctrl-C or `cancel`.
    """
    require_space(root, arch, codec)
    with _locked(root):
        return _build(ckpt, arch, codec, root, progress, cancel)


def _build(
    ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, progress: bool, cancel: threading.Event | None
) -> ExpertStore:
    spec = store_spec(arch, codec)
    layout = spec.layout
    final = root / layout.precision
    clean_stale_tmp(root)
    needed = _needed_bytes(layout, len(spec.layers) * spec.num_experts)
    free = _free_bytes(root)  # again under the lock: another build may have taken space meanwhile
    if free < needed:
        raise _disk_full(root, "checked before conversion", needed, free)
    try:
        tmp = make_tmp(root, layout.precision)
    except OSError as e:
        raise _write_error(root, e, needed) from e
    trash = None
    try:
        manifest = _write(ckpt, arch, codec, spec, tmp, progress, cancel)
        if final.exists():
            trash = make_tmp(root, "old")
            final.rename(trash / "old")
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException as e:
        remove_tmp(tmp)
        if isinstance(e, OSError):
            raise _write_error(root, e, needed) from e
        raise
    if trash is not None:
        try:
            remove_tmp(trash)
        except OSError as e:  # marked: a later open or convert removes it
            log.warning("cannot remove the replaced store in %s (%s)", trash, e.strerror)
    return ExpertStore(final, manifest)


def _write(
    ckpt: Checkpoint, arch: Arch, codec: Codec, spec: StoreSpec, tmp: Path, progress: bool,
    cancel: threading.Event | None,
) -> Manifest:
    layout = spec.layout
    total = len(spec.layers) * spec.num_experts
    data_path = tmp / DATA
    crcs: list[int] = []
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:  # reserve the space now: a full disk fails here, not after minutes of work
            os.posix_fallocate(fd, 0, total * layout.size)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise OSError(e.errno, e.strerror, DATA) from e
            os.ftruncate(fd, total * layout.size)  # the file system cannot reserve (EOPNOTSUPP): sparse
        bar = tqdm(total=total, desc=f"converting experts ({layout.precision})", unit="expert", disable=not progress)
        with bar:
            index = 0
            for layer in spec.layers:
                for expert in range(spec.num_experts):
                    if cancel is not None and cancel.is_set():
                        raise StoreError(f"{tmp.parent}: conversion cancelled", path=str(tmp.parent))
                    raw = memoryview(encode_blob(ckpt, arch, codec, layout, layer, expert).data)
                    crcs.append(_core.crc32(raw))
                    try:
                        _write_all(fd, raw, index * layout.size)
                    except OSError as e:
                        raise OSError(e.errno, e.strerror, DATA) from e
                    index += 1
                    bar.update(1)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = data_path.stat()
    manifest = Manifest(
        fingerprint=ckpt.fingerprint(),
        family=spec.family,
        layout=layout,
        num_experts=spec.num_experts,
        layers=spec.layers,
        data_size=st.st_size,
        data_mtime_ns=st.st_mtime_ns,
        crc32=tuple(crcs),
    )
    text = json.dumps(manifest.to_json()).encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(text), 0)
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, MANIFEST) from e
    finally:
        os.close(fd)
    _fsync_dir(tmp)
    return manifest


def _native_fp8(ckpt: Checkpoint, codec: Codec, mats: list[HubTensor]) -> dict[str, torch.Tensor] | None:
    """An FP8 checkpoint's expert for an FP8 store: its bytes, not re-quantized; None otherwise."""
    if not isinstance(codec, Fp8Codec) or fp8.native_precision(ckpt) is None:
        return None
    gate, up, down = (_fp8_pair(ckpt, t) for t in mats)
    if gate is None or up is None or down is None:
        return None
    return codec.encode_fp8(gate, up, down)


def _fp8_pair(ckpt: Checkpoint, tensor: HubTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes, scale_inv) of an expert matrix the checkpoint stores FP8 (store/fp8.py), else None."""
    if ckpt.scale_inv(tensor.name) is None:
        return None
    if tensor.part is not None:
        raise UnsupportedModel(f"{ckpt.path}: {tensor.name!r} is a fused FP8 expert tensor; only per-expert FP8 "
                               f"checkpoints are read", path=str(ckpt.path), field=tensor.name)
    ckpt.expect_shape(tensor.name, tensor.shape)
    return fp8.read_fp8(ckpt, tensor.name)


def _expert_tensor(ckpt: Checkpoint, tensor: HubTensor) -> torch.Tensor:
    pair = _fp8_pair(ckpt, tensor)
    if pair is not None:  # another precision than FP8's own: the float weight the checkpoint means
        block = fp8.checkpoint_block(ckpt)
        assert block is not None  # read_fp8 refused it
        return fp8.dequantize(*pair, torch.float32, block)
    return read_tensor(ckpt, tensor)  # a fused layout's expert is a slice (models/tensors.py)


def open_or_convert(
    ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, *, mode: str = "auto", progress: bool = True,
    cancel: threading.Event | None = None,
) -> ExpertStore:
    """The store of `codec`'s precision: reused when valid, (re)built when `mode` allows.

    mode: 'auto' reuses a valid store and rebuilds a missing, stale, corrupt or changed one;
    'never' refuses (StoreError naming why, e.g. the manifest field) instead of building;
    'rebuild' always rebuilds (unless another process just did while this one waited for the lock).
    Marked leftovers of dead builds in `root` are removed first.
    """
    spec = store_spec(arch, codec)
    final = root / spec.layout.precision
    clean_stale_tmp(root)
    if mode != "rebuild":
        try:
            return ExpertStore.open(final, ckpt.fingerprint(), spec)
        except StoreError as e:
            if mode == "never":
                raise StoreError(
                    f"{e}; store_mode='never' does not rebuild it (use store_mode='auto' or `moeflow convert --force`)",
                    path=e.path,
                ) from e
            log.info("building the expert store: %s", e)
    require_space(root, arch, codec)
    with _locked(root) as lock:
        if mode != "rebuild" or lock.waited:  # another process may have built it meanwhile
            try:
                return ExpertStore.open(final, ckpt.fingerprint(), spec)
            except StoreError:
                pass
        return _build(ckpt, arch, codec, root, progress, cancel)


async def open_or_convert_async(
    ckpt: Checkpoint, arch: Arch, codec: Codec, root: Path, *, mode: str = "auto", progress: bool = True
) -> ExpertStore:
    """open_or_convert on a worker thread; when the awaiting task is cancelled (Ctrl-C under asyncio.run),
    the conversion stops after the expert in hand and its temporary folder is removed before this returns."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(
        None, lambda: open_or_convert(ckpt, arch, codec, root, mode=mode, progress=progress, cancel=cancel)
    )
    try:
        return await asyncio.shield(work)
    except BaseException:
        cancel.set()
        try:
            await asyncio.wait({work}, timeout=30)
        finally:
            if work.done() and not work.cancelled():
                work.exception()  # consumed: the cancellation is what the caller sees
        raise

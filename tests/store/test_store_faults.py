"""Store faults: disk full, read-only checkpoints, bad store_dir values, Ctrl-C under asyncio: typed errors, nothing left."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.errors import ConfigError, StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import codec_for, open_or_convert, resolve_store_root, store_root
from moeflow.store.scratch import MARKER, make_tmp

conv = importlib.import_module("moeflow.store.convert")  # the module (moeflow.store exports a function of that name)
REPO = Path(__file__).parents[2]


@pytest.fixture
def model(hf_checkpoints, tmp_path: Path):  # type: ignore[no-untyped-def]
    ckpt = Checkpoint(hf_checkpoints.path("qwen2_moe"))
    return ckpt, parse_arch(ckpt), tmp_path / "stores"


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` read-only for real: a read-only bind mount (root) or mode 0555 (other users); skips otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if not (_mount("--bind", str(path), str(path)) and _mount("-o", "remount,ro,bind", str(path))):
        subprocess.run(["umount", str(path)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here")
    try:
        yield
    finally:
        # lazy: a memory map of a shard may outlive the test's Checkpoint until the next collection
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("fail_at", ["data", "manifest"])
def test_disk_full_is_a_store_error_with_sizes_and_no_temp_folder(model, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    real = conv._write_all
    calls = {"n": 0}
    blobs = len(arch.moe_layers) * arch.num_experts

    def full(fd: int, data: memoryview, offset: int) -> None:
        calls["n"] += 1
        if (fail_at == "data" and calls["n"] == 3) or (fail_at == "manifest" and calls["n"] == blobs + 1):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(conv, "_write_all", full)
    with pytest.raises(StoreError) as e:
        open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    message = str(e.value)
    assert "needs" in message and "free" in message and "MiB" in message
    assert ("experts.bin" if fail_at == "data" else "manifest.json") in message
    assert ".tmp-" not in message
    assert list(root.iterdir()) == []  # temp folder and lock file gone


def test_disk_full_while_making_the_temporary_folder_is_a_store_error(model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    scratch = importlib.import_module("moeflow.store.scratch")
    real_mkdir = Path.mkdir

    def full(self: Path, *args: object, **kwargs: object) -> None:
        if self.name.startswith(scratch.TMP_PREFIX):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(StoreError, match=r"disk full while writing the temporary folder\): it needs \d+ bytes") as e:
        open_or_convert(ckpt, arch, codec_for("float32"), root, progress=False)
    assert ".tmp-" not in str(e.value)
    assert list(root.iterdir()) == []


def test_a_disk_too_small_is_refused_before_conversion(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, _ = model
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(StoreError, match=r"needs \d+ bytes .* are free"):
            open_or_convert(ckpt, arch, codec_for("float32"), small / "stores", progress=False)
        assert not (small / "stores").exists()  # checked before anything is written, the folder included
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("value", ["", "   ", "/proc/x", "/proc/self/stores", "/sys/kernel/x"])
def test_store_dir_empty_or_in_a_kernel_file_system_is_a_config_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="store_dir"):
        store_root(tmp_path, value)


def test_store_dir_that_is_a_file_or_under_one_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    for value in (file, file / "stores"):
        with pytest.raises(ConfigError, match="store_dir.*file"):
            store_root(tmp_path, str(value))


@pytest.mark.asyncio
async def test_engine_refuses_an_empty_store_dir_and_writes_nothing_in_the_cwd(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="store_dir"):
        await Engine.open(hf_checkpoints.path("mixtral"), device="cpu", store_dir="")
    assert list(tmp_path.iterdir()) == []


def test_read_only_checkpoint_falls_back_to_the_user_cache_and_says_so(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("qwen2_moe"), model, ignore=shutil.ignore_patterns(".moeflow"))
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "cache"))
    with read_only(model):
        location = resolve_store_root(model, None)
        assert location.root.parent == tmp_path / "cache"
        assert location.note is not None and "read-only" in location.note and str(location.root) in location.note
        with caplog.at_level(logging.WARNING, logger="moeflow.store"):
            root = store_root(model, None)
        assert "read-only" in caplog.text
        ckpt = Checkpoint(model)
        store = open_or_convert(ckpt, parse_arch(ckpt), codec_for("float32"), root, progress=False)
        assert store.path.parent == root
        assert not (model / ".moeflow").exists()
        ckpt.close()


@pytest.mark.asyncio
async def test_engine_on_a_read_only_checkpoint_serves_from_the_cache_and_logs_it(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("mixtral"), model, ignore=shutil.ignore_patterns(".moeflow"))
    async with Engine.open(model, device="cpu", store_dir=str(tmp_path / "reference")) as eng:
        expected = (await eng.generate([5, 17, 42], 4)).tokens
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "cache"))
    with read_only(model), caplog.at_level(logging.WARNING, logger="moeflow.store"):
        async with Engine.open(model, device="cpu") as eng:
            assert (await eng.generate([5, 17, 42], 4)).tokens == expected
            assert eng.session.store_note and "read-only" in eng.session.store_note  # the plan says so
            assert eng.session.store_root is not None and (tmp_path / "cache") in eng.session.store_root.parents
    assert "is read-only: the expert store lives in" in caplog.text
    assert list((tmp_path / "cache").glob("model-*/float32/manifest.json"))


def test_read_only_checkpoint_with_a_prebuilt_store_uses_it_in_place(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("qwen2_moe"), model, ignore=shutil.ignore_patterns(".moeflow"))
    ckpt = Checkpoint(model)
    arch, codec = parse_arch(ckpt), codec_for("float32")
    built = open_or_convert(ckpt, arch, codec, model / ".moeflow", progress=False)
    leftover = make_tmp(model / ".moeflow", "float32")  # marked by this process, then made to look dead
    (leftover / MARKER).write_text(json.dumps({"pid": 2**22 + 1, "start": 0, "host": os.uname().nodename}))
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "cache"))
    with read_only(model):
        location = resolve_store_root(model, None)
        assert location.root == model / ".moeflow" and location.note and "read-only" in location.note
        store = open_or_convert(ckpt, arch, codec, location.root, mode="never", progress=False)
        assert store.manifest == built.manifest
        assert leftover.exists()  # cannot be removed on a read-only disk, and that does not stop the open
    assert not (tmp_path / "cache").exists()
    ckpt.close()


def test_read_only_checkpoint_and_no_writable_cache_is_a_config_error(hf_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("qwen2_moe"), model, ignore=shutil.ignore_patterns(".moeflow"))
    monkeypatch.setenv("MOEFLOW_CACHE", str(model / "cache"))  # inside the read-only folder
    with read_only(model):
        with pytest.raises(ConfigError, match="store_dir"):
            resolve_store_root(model, None)


def test_store_dir_on_a_read_only_disk_is_a_store_error_naming_store_dir(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, _ = model
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        with pytest.raises(StoreError, match="set store_dir to a writable folder"):
            open_or_convert(ckpt, arch, codec_for("float32"), store_root(ckpt.path, str(ro / "stores")), progress=False)


_ASYNC_CONVERT = """
import asyncio, sys, time, torch
from pathlib import Path
from moeflow.models import Checkpoint, parse_arch
from moeflow.store.codecs import DenseCodec
from moeflow.store import open_or_convert_async
class Slow(DenseCodec):  # a conversion of several seconds
    def encode(self, g, u, d):
        time.sleep(0.3)
        return super().encode(g, u, d)
ck = Checkpoint(sys.argv[1])
asyncio.run(open_or_convert_async(ck, parse_arch(ck), Slow(torch.float32), Path(sys.argv[2]), progress=False))
"""


def test_ctrl_c_under_asyncio_stops_the_conversion_thread_within_a_second(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, _, root = model
    proc = subprocess.Popen([sys.executable, "-c", _ASYNC_CONVERT, str(ckpt.path), str(root)], cwd=REPO,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-float32") for p in (root.iterdir() if root.exists() else [])):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while any(root.iterdir()) and time.monotonic() - sent < 5:  # stopped = its temporary folder is gone
            time.sleep(0.01)
        stopped = time.monotonic() - sent
        _, err = proc.communicate(timeout=10)  # the interpreter's own exit is not counted
        assert stopped < 1.0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err
    assert list(root.iterdir()) == []

"""Safe store builds: one converter at a time across processes, and only moeflow's own dead leftovers removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeflow.errors import StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import ExpertStore, codec_for, convert, open_or_convert
from moeflow.store.scratch import MARKER, clean_stale_tmp, make_tmp, process_start_time

REPO = Path(__file__).parents[2]

_OPENER = """
import importlib, json, sys, time, torch
from pathlib import Path
conv = importlib.import_module("moeflow.store.convert")  # the module, not the function moeflow.store exports
from moeflow.models import Checkpoint, parse_arch
from moeflow.store.codecs import DenseCodec
builds = []
real_write = conv._write
def counting(*a, **k):
    builds.append(1)
    return real_write(*a, **k)
conv._write = counting
class Slow(DenseCodec):  # widens the window in which the other process arrives
    def encode(self, g, u, d):
        time.sleep(0.05)
        return super().encode(g, u, d)
ck = Checkpoint(sys.argv[1]); arch = parse_arch(ck); codec = Slow(torch.float32)
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.002)
store = conv.open_or_convert(ck, arch, codec, Path(sys.argv[2]), progress=False)
data = store.data_path.read_bytes()
ok = all(
    data[store.offset(l, e): store.offset(l, e) + store.blob_size]
    == conv.encode_blob(ck, arch, codec, store.layout, l, e).tobytes()
    for l in arch.moe_layers for e in range(arch.num_experts)
)
print(json.dumps({"builds": len(builds), "ok": ok}))
"""


@pytest.fixture
def model(hf_checkpoints, tmp_path: Path):  # type: ignore[no-untyped-def]
    ckpt = Checkpoint(hf_checkpoints.path("qwen2_moe"))
    return ckpt, parse_arch(ckpt), tmp_path / "stores"


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_opening_one_model_convert_once_and_both_get_the_store(model, tmp_path: Path, round_: int) -> None:  # type: ignore[no-untyped-def]
    ckpt, _, root = model
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPENER, str(ckpt.path), str(root), str(go)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    try:
        time.sleep(1.5)  # both imported and waiting at the barrier
        go.touch()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert sorted(r["builds"] for r in results) == [0, 1]
    assert all(r["ok"] for r in results)
    assert sorted(p.name for p in root.iterdir()) == ["float32"]  # no lock file, no temp folder left


def _dead_pid() -> tuple[int, int | None]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def _leftover(root: Path, name: str, pid: int, start: int | None) -> Path:
    tmp = root / name
    (tmp / "float32").mkdir(parents=True)
    (tmp / "float32" / "experts.bin").write_bytes(b"\0" * 8192)
    (tmp / MARKER).write_text(json.dumps({"pid": pid, "start": start, "host": os.uname().nodename}))
    return tmp


def test_only_marked_leftovers_of_gone_owners_are_removed_on_open(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    codec = codec_for("float32")
    open_or_convert(ckpt, arch, codec, root, progress=False)  # a valid store: opens do not convert
    notes = root / ".tmp-my-notes"
    notes.mkdir()
    (notes / "important.txt").write_text("keep me")
    unmarked_with_pid = root / f".tmp-float32-{_dead_pid()[0]}-abcdef12"
    unmarked_with_pid.mkdir()
    dead = _leftover(root, ".tmp-float32-dead", *_dead_pid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_start = process_start_time(sleeper.pid)
        assert live_start is not None
        reused = _leftover(root, ".tmp-float32-reused", sleeper.pid, live_start - 1)  # pid reused by another process
        live = _leftover(root, ".tmp-float32-live", sleeper.pid, live_start)
        open_or_convert(ckpt, arch, codec, root, mode="never", progress=False)
        assert not dead.exists() and not reused.exists()
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (notes / "important.txt").read_text() == "keep me"
    assert unmarked_with_pid.exists()
    convert(ckpt, arch, codec, root, progress=False)  # convert cleans too, and still spares the unmarked
    assert not live.exists()
    assert (notes / "important.txt").read_text() == "keep me"
    assert unmarked_with_pid.exists()


def test_own_marker_names_this_process_and_its_start_time(tmp_path: Path) -> None:
    tmp = make_tmp(tmp_path, "float32")
    marker = json.loads((tmp / MARKER).read_text())
    assert marker["pid"] == os.getpid()
    assert marker["start"] == process_start_time(os.getpid())
    assert clean_stale_tmp(tmp_path) == [] and tmp.exists()  # its owner is alive


_SLOW_CONVERT = """
import sys, time, torch
from pathlib import Path
from moeflow.models import Checkpoint, parse_arch
from moeflow.store.codecs import DenseCodec
from moeflow.store import convert
class Slow(DenseCodec):
    def encode(self, g, u, d):
        time.sleep(0.3)
        return super().encode(g, u, d)
ck = Checkpoint(sys.argv[1])
convert(ck, parse_arch(ck), Slow(torch.float32), Path(sys.argv[2]), progress=False)
"""


def _start_slow_convert(ckpt: Checkpoint, root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(ckpt.path), str(root)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-float32") for p in (root.iterdir() if root.exists() else [])):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    time.sleep(0.5)
    return proc


def test_kill_9_during_forced_rebuild_over_a_valid_store_is_cleaned_on_next_open(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    codec = codec_for("float32")
    valid = open_or_convert(ckpt, arch, codec, root, progress=False)
    proc = _start_slow_convert(ckpt, root)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())
    again = open_or_convert(ckpt, arch, codec, root, mode="never", progress=False)  # the old store still serves
    assert again.manifest == valid.manifest
    # the dead build's lock file may stay (an empty file its death unlocked); its data may not
    assert sorted(p.name for p in root.iterdir() if p.name != ".build.lock") == ["float32"]


def test_sigint_during_conversion_stops_within_a_second_and_leaves_nothing(model) -> None:  # type: ignore[no-untyped-def]
    ckpt, _, root = model
    proc = _start_slow_convert(ckpt, root)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while any(root.iterdir()) and time.monotonic() - sent < 5:  # stopped = its temporary folder is gone
        time.sleep(0.01)
    assert time.monotonic() - sent < 1.0
    proc.wait(timeout=10)  # the interpreter's own exit is not counted
    assert proc.returncode != 0
    assert list(root.iterdir()) == []
    with pytest.raises(StoreError, match="no manifest"):
        ExpertStore.open(root / "float32", ckpt.fingerprint())


def test_unmarked_folders_named_like_leftovers_survive_conversion_in_a_shared_store_dir(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, _ = model
    shared = tmp_path / "shared"
    shared.mkdir()
    names = [".tmp-my-notes", f".tmp-float32-{_dead_pid()[0]}-00000000", ".tmp-old-1-2"]
    for name in names:
        (shared / name).mkdir()
        (shared / name / "important.txt").write_text(name)
    convert(ckpt, arch, codec_for("float32"), shared, progress=False)
    open_or_convert(ckpt, arch, codec_for("float32"), shared, progress=False)
    for name in names:
        assert (shared / name / "important.txt").read_text() == name
    assert sorted(p.name for p in shared.iterdir()) == sorted([*names, "float32"])

"""Ctrl-C while Engine.open converts the store stops the conversion within a second and leaves nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HFCheckpoints

REPO = Path(__file__).resolve().parents[2]

_OPEN = """
import asyncio, sys, time
from moeflow import Engine
from moeflow.store.codecs import DenseCodec
_encode = DenseCodec.encode
def slow(self, g, u, d):  # a conversion of several seconds
    time.sleep(0.3)
    return _encode(self, g, u, d)
DenseCodec.encode = slow
async def main():
    async with Engine.open(sys.argv[1], device="cpu", store_dir=sys.argv[2], progress=False):
        pass
asyncio.run(main())
"""


@pytest.mark.timeout(120)
def test_ctrl_c_during_engine_open_stops_the_conversion_and_removes_its_folder(
    hf_checkpoints: HFCheckpoints, tmp_path: Path
) -> None:
    root = tmp_path / "stores"
    proc = subprocess.Popen([sys.executable, "-c", _OPEN, str(hf_checkpoints.path("qwen2_moe")), str(root)],
                            cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-") for p in (root.iterdir() if root.exists() else [])):
            assert time.monotonic() < deadline and proc.poll() is None, "the conversion never started"
            time.sleep(0.02)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while any(p.name.startswith(".tmp-") for p in root.iterdir()) and time.monotonic() - sent < 5:
            time.sleep(0.01)
        stopped = time.monotonic() - sent
        _, err = proc.communicate(timeout=30)
        assert stopped < 1.0, err.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert not [p for p in root.iterdir() if not p.name.startswith(".build.lock")]

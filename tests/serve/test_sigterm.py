"""`moeflow serve` on SIGTERM: in-flight streams finish within --drain-seconds, longer ones are cut, the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url


def _serve(model: Path, drain_seconds: int) -> Iterator[_Served]:
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moeflow.cli", "serve", str(model), "--port", str(port), "--model-name", "tiny",
         "--drain-seconds", str(drain_seconds), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield _Served(process, url)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _stream_then_sigterm(served: _Served, max_tokens: int) -> tuple[int, bool, float]:
    """Start a stream, SIGTERM the server after its first tokens; (tokens its usage reports: 0
    if it never ended, [DONE] seen,
    seconds from the signal to the process's exit)."""
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events, tokens, done, signalled = 0, 0, False, 0.0
    with httpx.Client(base_url=served.url, timeout=60) as http:
        try:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        events += 1
                        usage = json.loads(line[6:])["usage"]
                        tokens = usage["completion_tokens"] if usage else tokens
                        if events == 3 and not signalled:
                            served.process.send_signal(signal.SIGTERM)
                            signalled = time.monotonic()
        except httpx.TransportError:
            pass  # the server cut the stream
    served.process.wait(timeout=60)
    return tokens, done, time.monotonic() - signalled


@pytest.mark.timeout(240)
def test_sigterm_lets_an_in_flight_stream_finish_within_the_drain(tiny_model: Path) -> None:
    for served in _serve(tiny_model, drain_seconds=60):
        tokens, done, _ = _stream_then_sigterm(served, max_tokens=300)
        assert done and tokens == 300
        assert served.process.returncode == 0
        out = served.process.stdout.read() if served.process.stdout else ""
        assert "Traceback" not in out and "Waiting for connections to close" in out, out
        assert out.rstrip().endswith("closed"), out  # the engine closed after the drain
        # the start-up names the memory plan, as `moeflow run` does (Session.plan_line)
        assert "moeflow serve: plan: budget " in out and " experts; predictor " in out, out


@pytest.mark.timeout(240)
def test_sigterm_cancels_what_outlasts_the_drain_and_exits(tiny_model: Path) -> None:
    for served in _serve(tiny_model, drain_seconds=1):
        tokens, done, seconds = _stream_then_sigterm(served, max_tokens=4000)
        assert not done and tokens == 0
        assert seconds < 20  # 1 s of drain, one step to cancel, the engine closed
        assert served.process.returncode == 0
        out = served.process.stdout.read() if served.process.stdout else ""
        assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in out, out
        assert "moeflow serve: stopped, engine for" in out, out
        # uvicorn logs the cancellation it caused as a traceback ending in CancelledError; any
        # other error (the engine failing to close, a leak warning) would show up as well
        assert out.count("Traceback") == 1, out
        errors = [line for line in out.splitlines() if "Error" in line or "Warning" in line]
        assert errors == ["asyncio.exceptions.CancelledError: Task cancelled, timeout graceful shutdown exceeded"], out

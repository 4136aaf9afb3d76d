"""Review of runtime/cpu_bf16.py and rust/core/src/gemm (2026-11-28): inputs the wrappers pass on
unchecked, so that the core reads memory outside the tensors it was given or gives other bits
than its documented arithmetic. Each test states what should happen; each failed when written
(strict xfails naming the defect) and passes since the fixes that followed the review."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeflow import _core
from moeflow.runtime import cpu_bf16
from moeflow.store import mxfp4, quant

pytestmark = pytest.mark.skipif(not _core.bf16_linear_available(), reason="the kernel needs AVX2, FMA and F16C")


@pytest.fixture
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_bf16, "ENABLED", True)


def test_mxfp4_refuses_a_bias_that_is_not_n_values() -> None:
    g = torch.Generator().manual_seed(1)
    blocks, scales = mxfp4.quantize(torch.randn(8, 64, generator=g) * 0.1)
    x = torch.randn(2, 64, generator=g)  # float32 rows: the bias reaches the core uncopied
    base = torch.arange(100, dtype=torch.float32) * 1000
    bias = base[:1]  # one value (F.linear broadcasts it); base[1:8] lies after it
    with pytest.raises(ValueError, match="bias"):
        got = cpu_bf16.mxfp4_linear(x, blocks, scales, bias)
        # what it computes today: base[0:8] as the bias, not bias[0] broadcast
        want = F.linear(x, mxfp4.dequantize(blocks, scales, torch.float32), bias)
        assert not torch.allclose(got, want)


def test_minmax_refuses_codes_that_are_not_a_matrix(kernel_on: None) -> None:
    g = torch.Generator().manual_seed(2)
    q, scale, zero = quant.quantize(torch.randn(16, 16, generator=g), 8, 16)
    codes = q.reshape(-1)[:16]  # 16 bytes, a view of the 256-byte matrix: the core reads all 256
    with pytest.raises((ValueError, TypeError)):
        cpu_bf16.minmax_linear(torch.randn(1, 16, generator=g).bfloat16(), codes, scale, zero, 8, 16)


@pytest.mark.parametrize("product", ["linear", "mxfp4"])
def test_a_bias_off_the_cpu_is_refused(kernel_on: None, product: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, generator=g).bfloat16()
    bias = torch.ones(8, device="meta")
    with pytest.raises((ValueError, RuntimeError)):  # F.linear: "Tensor on device meta is not on the expected device"
        if product == "linear":
            cpu_bf16.linear(x, torch.randn(8, 64, generator=g).bfloat16(), bias)
        else:
            cpu_bf16.mxfp4_linear(x, *mxfp4.quantize(torch.randn(8, 64, generator=g)), bias)


def test_no_features_is_what_f_linear_gives(kernel_on: None) -> None:
    x = torch.randn(3, 0).bfloat16()
    w = torch.empty(4, 0, dtype=torch.bfloat16)
    bias = torch.arange(4.0).bfloat16()
    assert torch.equal(cpu_bf16.linear(x, w, bias), F.linear(x, w, bias))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_nan_scale_stays_nan_with_bf16_weights(kernel_on: None, bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    q, scale, zero = quant.quantize(torch.randn(4, 32, generator=g), bits, 32)
    scale.view(torch.int16)[0, 0] = 0x7FFF  # a float16 NaN (payload all ones), as a corrupt store holds
    x = torch.randn(1, 32, generator=g).bfloat16()
    want = cpu_bf16.linear(x, quant.dequantize(q, scale, zero, bits, 32, torch.bfloat16))
    assert want[0, 0].isnan()
    got = cpu_bf16.minmax_linear(x, q, scale, zero, bits, 32)
    assert torch.equal(got.isnan(), want.isnan())


def test_the_thread_count_does_not_change_bits_under_flush_denormal(kernel_on: None) -> None:
    k, n = 8, 16400  # k = 8: 8196 columns a panel, so 3 panels and up to 3 groups of them
    x = torch.full((1, k), 1e-39)  # float32 subnormals
    w = torch.ones(n, k, dtype=torch.bfloat16)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    cpu_bf16.linear(x, w)  # rayon's pool exists before the switch, as in a running engine
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        torch.set_num_threads(1)
        one = cpu_bf16.linear(x, w)
        torch.set_num_threads(2)
        two = cpu_bf16.linear(x, w)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(saved)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))  # bits: the values print as 0 under DAZ


_OVERFLOW = """
import torch
from moeflow import _core
x, w, y = torch.zeros(8), torch.zeros(64, dtype=torch.bfloat16), torch.zeros(8)
try:
    _core.bf16_linear(x.data_ptr(), 2**61, 8, w.data_ptr(), 8, y.data_ptr(), False, False, 0, 1)
except ValueError:
    raise SystemExit(0)
raise SystemExit(3)
"""


def _no_core_file() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def test_sizes_whose_products_overflow_are_refused() -> None:
    run = subprocess.run([sys.executable, "-c", _OVERFLOW], capture_output=True, timeout=120,
                         preexec_fn=_no_core_file)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr.decode()[-500:]}"


_FORK = """
import os, time, torch
from moeflow.runtime import cpu_bf16, cpu_ops
{setup}
{call}  # the parent's pool exists before the fork, as in a running engine
pid = os.fork()
if pid == 0:
    {call}
    os._exit(0)
for _ in range(50):
    if os.waitpid(pid, os.WNOHANG)[0]:
        raise SystemExit(0)
    time.sleep(0.1)
os.kill(pid, 9)
os.waitpid(pid, 0)
raise SystemExit(4)
"""


def _child_finishes(setup: str, call: str) -> None:
    script = _FORK.format(setup=setup, call=call)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, preexec_fn=_no_core_file)
    assert run.returncode == 0, f"exit {run.returncode} (4: the child hung): {run.stderr.decode()[-500:]}"


def test_a_forked_child_can_still_compute() -> None:
    _child_finishes("cpu_bf16.ENABLED = True\ntorch.set_num_threads(2)\n"
                    "x, w = torch.randn(1, 2048).bfloat16(), torch.randn(512, 2048).bfloat16()  # 16 panels",
                    "cpu_bf16.linear(x, w)")


def test_a_forked_child_can_still_normalize() -> None:
    _child_finishes("torch.set_num_threads(2)\n"
                    "x, w = torch.randn(256, 1024), torch.ones(1024)  # 2**18 values: rows split over threads",
                    "cpu_ops.rms_norm(x, w, 1e-6)")

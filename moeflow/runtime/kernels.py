"""The CUDA kernels in kernels/: finding their sources, compiling them with NVRTC, loading them with CuPy.

The sources ship inside the wheel (moeflow/_kernels, a link to the checkout's kernels/ folder) and
are found from a checkout or an installed wheel alike. `compile_check` needs only the NVRTC
library (which torch's CUDA build brings along), no GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.errors import CudaUnavailable

SOURCES = ("dequant.cu", "expert_ffn.cu", "grouped_ffn.cu", "fp8.cu", "mxfp4.cu", "moe_decode.cu", "grouped_mma.cu",
           "moe_decode_kslice.cu")
COMMON = "common.cuh"
OPTIONS = ("-std=c++17",)
_ENTRY = re.compile(r'extern "C" __global__ void (\w+)\(')
_DECLARATION = re.compile(r'extern "C" __global__ void ([\w#]+)\(([^)]*)\)')
_MACRO_PARAM = re.compile(r"[A-Z][A-Z0-9_]*")
_MACRO_USE = re.compile(r"^(DEQUANT|EXPERT_FFN|GROUPED|MOE_DECODE|GROUPED_MMA|MOE_DECODE_KSLICE)"
                        r"\((\w+), (\w+), (\w+)\)", re.M)


def kernel_dir() -> Path:
    """The folder holding the .cu sources: inside the installed package, else the checkout's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if (candidate / COMMON).is_file():
            return candidate
    raise FileNotFoundError(f"moeflow kernel sources not found under {here / '_kernels'} or {here.parent / 'kernels'}")


def source(name: str) -> str:
    """One kernel file with the common header prepended (what NVRTC and CuPy compile)."""
    d = kernel_dir()
    return (d / COMMON).read_text() + "\n" + (d / name).read_text()


def entry_points(name: str) -> list[str]:
    """The extern "C" kernels a source defines, macro instances expanded."""
    text = (kernel_dir() / name).read_text()
    names = [n for n in _ENTRY.findall(text) if "##" not in n]
    for macro, _bits, suffix, _t in _MACRO_USE.findall(text):
        if macro == "DEQUANT":
            names.append(f"dequant_int{_bits}_{suffix}")
        elif macro == "EXPERT_FFN":
            names.append(f"expert_ffn_decode_{suffix}")
        elif macro == "MOE_DECODE":
            names += [f"decode_gate_up_{suffix}", f"decode_down_{suffix}"]
        elif macro == "MOE_DECODE_KSLICE":
            names += [f"kslice_{phase}_{suffix}_t{tok}" for phase in ("gate_up", "down") for tok in (1, 4)]
        elif macro == "GROUPED_MMA":
            names += [f"mma_gate_up_{suffix}", f"mma_down_{suffix}"]
        else:
            names += [f"grouped_gate_up_{suffix}", f"grouped_down_{suffix}"]
    return names


def signature(name: str, entry: str) -> tuple[str, ...]:
    """The C types of an entry point's parameters, in order (e.g. ('const uint16_t*', 'int', ...)):
    what a launch must pass, checked on machines without a GPU."""
    text = (kernel_dir() / name).read_text().replace("\\\n", " ")
    for pattern, params in _DECLARATION.findall(text):
        parts = pattern.split("##")
        regex = "".join(r"\w+" if _MACRO_PARAM.fullmatch(p) else re.escape(p) for p in parts)
        if re.fullmatch(regex, entry):
            return tuple(" ".join(p.split()[:-1]).replace(" *", "*") for p in params.split(","))
    raise KeyError(f"{entry!r} is not an entry point of {name}")


# ---- NVRTC (compile only, no GPU) ------------------------------------------------------------
def _nvrtc_candidates() -> list[str]:
    found: list[str] = []
    for base in sys.path:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(glob.glob(os.path.join(base, pattern)), reverse=True)
    found = [f for f in found if "builtins" not in f and "alt" not in os.path.basename(f)]
    lib = ctypes.util.find_library("nvrtc")
    if lib:
        found.append(lib)
    return found + ["libnvrtc.so"]


@functools.cache
def nvrtc() -> ctypes.CDLL:
    errors = []
    for path in _nvrtc_candidates():
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise CudaUnavailable("NVRTC library not found (install torch's CUDA build or nvidia-cuda-nvrtc): " + "; ".join(errors))


@dataclass(frozen=True)
class CompileResult:
    source: str
    arch: str
    ok: bool
    log: str
    binary_bytes: int


def compile_source(name: str, arch: str) -> CompileResult:
    """Compile one source to a cubin for `arch` (e.g. 'sm_80') with NVRTC."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    code = source(name).encode()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, name.encode(), 0, None, None)
    if rc != 0:
        return CompileResult(name, arch, False, f"nvrtcCreateProgram failed ({rc})", 0)
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in OPTIONS)]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log_buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log_buf)
        log = log_buf.value.decode(errors="replace").strip()
        if rc != 0:
            return CompileResult(name, arch, False, log, 0)
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        return CompileResult(name, arch, True, log, size.value)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_check(archs: tuple[str, ...] = ("sm_80", "sm_90")) -> list[CompileResult]:
    return [compile_source(name, arch) for name in SOURCES for arch in archs]


# ---- CuPy (on a GPU) ---------------------------------------------------------------------------
@functools.cache
def module(name: str) -> Any:
    """The CuPy RawModule of one source, compiled for the current device."""
    try:
        import cupy
    except ImportError as e:
        import torch

        major = (torch.version.cuda or "12").split(".")[0]  # CuPy's wheel must match torch's CUDA
        raise CudaUnavailable(f"CuPy is needed for moeflow's quantized-expert GPU kernels: pip install "
                              f"cupy-cuda{major}x (torch here is built for CUDA {torch.version.cuda})") from e
    return cupy.RawModule(code=source(name), options=OPTIONS)


@functools.cache
def function(source_name: str, entry: str, device_index: int) -> Any:
    """The loaded kernel (a cupy.cuda.function.Function) of one entry point on one device, resolved
    once: it takes raw pointers and numpy scalars, and the stream to launch on."""
    mod = module(source_name)  # raises CudaUnavailable without CuPy
    import cupy

    with cupy.cuda.Device(device_index):
        return mod.get_function(entry).kernel  # compiles (or loads from CuPy's cache) for this device

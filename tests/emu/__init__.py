"""kernels/*.cu on the CPU: each source compiled by g++ against tests/emu/cuda_cpu.h into a shared
library, and a `Launch` (runtime/gpu.py: entry point, grid, block, numpy-scalar arguments) run by
it on CPU tensors' pointers, exactly as the GPU would be handed it. With `emulated_kernels` (a
pytest fixture in tests/conftest.py) runtime/gpu.py's launchers run here, so every kernel is
checked against its torch reference in CI, which has no GPU.

Each library is built once per machine and kept under the temp folder, keyed by a hash of the
source, the header and the wrapper, so editing a kernel rebuilds it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from moeflow.runtime import kernels

HEADER = Path(__file__).with_name("cuda_cpu.h")
COMPILER = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w")


def unavailable() -> str | None:
    """Why kernels cannot be emulated here (no C++ compiler), or None."""
    return None if shutil.which(COMPILER) else f"no C++ compiler ({COMPILER}) to build the CUDA CPU emulator"


def wrapper_source(code: str, signatures: dict[str, tuple[str, ...]]) -> str:
    """Kernel code after the emulator's header, and per entry point an `emu_<entry>(dims, args)`
    taking the launch's grid and block and its argument addresses (`signatures`: the C types of
    each entry point's parameters, in order)."""
    lines = [f'#include "{HEADER}"', code]
    for entry, params in signatures.items():
        types = [t.replace("__restrict__", "").strip() for t in params]
        aliases = " ".join(f"using T{i} = {t};" for i, t in enumerate(types))
        values = " ".join(f"T{i} a{i} = *reinterpret_cast<T{i}*>(args[{i}]);" for i in range(len(types)))
        call = ", ".join(f"a{i}" for i in range(len(types)))
        lines.append(f'extern "C" int emu_{entry}(const unsigned* dims, void** args) {{ {aliases} {values} '
                     f"return moeflow_emu::launch(dims, [=] {{ {entry}({call}); }}); }}")
    return "\n".join(lines) + "\n"


def build(stem: str, code: str, signatures: dict[str, tuple[str, ...]]) -> ctypes.CDLL:
    """Compile kernel code for the CPU (cached on disk by a hash of everything that goes in)."""
    text = wrapper_source(code, signatures)
    key = hashlib.sha256((text + HEADER.read_text() + " ".join(FLAGS)).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"moeflow-cuda-emu-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{stem}-{key}.so"
    if not lib.exists():
        src = folder / f"{stem}-{key}.cpp"
        src.write_text(text)
        partial = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([COMPILER, *FLAGS, "-x", "c++", str(src), "-o", str(partial)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulating {stem}: {COMPILER} failed:\n{done.stderr[-4000:]}")
        partial.replace(lib)  # whole or absent: a concurrent build never sees half a library
    return ctypes.CDLL(str(lib))


@functools.cache
def library(name: str) -> ctypes.CDLL:
    """The CPU build of one kernels/ source (built on first use, then cached on disk)."""
    signatures = {entry: kernels.signature(name, entry) for entry in kernels.entry_points(name)}
    return build(Path(name).stem, kernels.source(name), signatures)


def _c_value(arg: Any) -> ctypes._SimpleCData:
    if isinstance(arg, np.uint64):
        return ctypes.c_uint64(int(arg))
    if isinstance(arg, np.int64):
        return ctypes.c_int64(int(arg))
    if isinstance(arg, np.int32):
        return ctypes.c_int32(int(arg))
    if isinstance(arg, np.uint32):
        return ctypes.c_uint32(int(arg))
    if isinstance(arg, np.float32):
        return ctypes.c_float(float(arg))
    raise TypeError(f"a launch argument must be a sized numpy scalar, got {type(arg).__name__} {arg!r}")


def run(launch: Any, device: Any = None) -> None:
    """Run one Launch on the CPU: its pointers must be CPU tensors' (the caller keeps them alive)."""
    call(library(launch.source), launch.entry, launch.grid, launch.block, launch.args)


def call(lib: ctypes.CDLL, entry: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
    fn = getattr(lib, f"emu_{entry}")
    fn.restype = ctypes.c_int
    dims = (ctypes.c_uint * 6)(*(*grid, 1, 1, 1)[:3], *(*block, 1, 1, 1)[:3])
    values = [_c_value(a) for a in args]
    addresses = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    if fn(dims, addresses) != 0:
        raise RuntimeError(f"{entry} grid {grid} block {block}: a block deadlocked in the CUDA emulator (see stderr)")

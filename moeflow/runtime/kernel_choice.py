"""Which GPU path computes a min-max quantized expert (int8/4/2) on its rows, chosen from a table
measured on the device (issue 13: "where cuBLAS ... on dequantised weights is faster for a shape,
use it; the choice is measured").

Paths of one expert's FFN on x [n, H] (each returns [n, H] in x's dtype):
- `moe_decode`: kernels/moe_decode.cu, weights dequantized in registers, read once per 8 rows;
- `grouped_mma`: kernels/grouped_mma.cu, tensor cores, weights dequantized tile by tile;
- `dequant_torch`: kernels/dequant.cu into x's dtype, then torch's SiLU MLP (cuBLAS on a GPU);
- `moe_decode_kslice`: kernels/moe_decode_kslice.cu (runtime/gpu_kslice.py), a decode candidate:
  8 weight rows per block share each chunk's activations, K split over its warps. Only a table
  ever picks it (it raises for shapes it cannot take, so the tuner never picks it there).

Without a table the engine runs moe_decode up to moe.DECODE_ROWS rows and grouped_mma above.
`benches/bench_kernels.py --tune` (runtime/kernel_tune.py) times every path per (device,
bits, group, hidden, inter, dtype, row bucket) and writes the table to
$MOEFLOW_CACHE/kernels-<device>.json; the engine loads it once per process and device at open
(`open_for`) and then pays one dict lookup per expert call (`choose`).

The choice depends only on the expert's encoding and shape, the activations' dtype and the
expert's row count, never on the budget, what is resident or what else runs in the step, so a
given table gives the same bits at every budget. A table can change results at the rounding
level against an untuned run: the paths accumulate in different orders.

Buckets: the rows of bucket b (1, 2, 4, ..., 256) are b/2 < n <= b; the last one (512) takes
every n > 256. The tuner measures each bucket at its upper edge (the last at 512 rows).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeflow.errors import KernelTableError
from moeflow.runtime import gpu, gpu_decode, gpu_kslice, gpu_mma
from moeflow.runtime.layers import silu_mlp
from moeflow.runtime.moe import DECODE_ROWS
from moeflow.store.layout import ExpertView
from moeflow.store.location import user_cache_dir

FORMAT, VERSION = "moeflow-kernel-table", 1
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LAST = len(BUCKETS) - 1
QUANT_BITS = (8, 4, 2)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Key = tuple[int, int, int, int, torch.dtype]  # (bits, group, hidden, inter, activation dtype)
Tensors = dict[str, torch.Tensor]


def _moe_decode(w: Tensors, bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
    return gpu_decode.expert_rows(x, [0, x.shape[0]], [w], bits, group).to(x.dtype)


def _grouped_mma(w: Tensors, bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
    return gpu_mma.grouped_expert_ffn(x, [0, x.shape[0]], [w], bits, group).to(x.dtype)


def _dequant_torch(w: Tensors, bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
    # temporaries on the current stream: the caching allocator reuses them in stream order, so
    # the dequantized scratch costs no allocation after the first call of a shape
    gate_up = gpu.dequantize(w["gate_up.q"], w["gate_up.scale"], w["gate_up.zero"], bits, group, x.dtype)
    down = gpu.dequantize(w["down.q"], w["down.scale"], w["down.zero"], bits, group, x.dtype)
    return silu_mlp(x, gate_up, down)


def _moe_decode_kslice(w: Tensors, bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
    return gpu_kslice.expert_rows(x, [0, x.shape[0]], [w], bits, group).to(x.dtype)


PATHS: dict[str, Callable[[Tensors, int, int, torch.Tensor], torch.Tensor]] = {
    "moe_decode": _moe_decode,
    "grouped_mma": _grouped_mma,
    "dequant_torch": _dequant_torch,
    "moe_decode_kslice": _moe_decode_kslice,
}
DECODE = "moe_decode"
KSLICE = "moe_decode_kslice"


def bucket(rows: int) -> int:
    """Index in BUCKETS of the bucket holding `rows` (>= 1)."""
    return min((rows - 1).bit_length(), _LAST)


def default_path(rows: int) -> str:
    """The untuned choice, what moe.expert_ffn does without a table."""
    return DECODE if rows <= DECODE_ROWS else "grouped_mma"


@dataclass(frozen=True)
class KernelTable:
    """A loaded table: the device it was measured on and, per key, one path name per bucket."""

    device: str
    choices: dict[Key, tuple[str, ...]]
    path: Path | None = None


# Installed tables, per torch device. Empty: moe.py takes its untuned code, not this module.
TABLES: dict[torch.device, dict[Key, tuple[str, ...]]] = {}
_OPENED: dict[torch.device, KernelTable | None] = {}  # what open_for found, once per process and device


def install(table: KernelTable | None, device: torch.device) -> None:
    """Make `table` the choice for experts computed on `device` (None: untuned there)."""
    TABLES.pop(device, None)
    if table is not None:
        TABLES[device] = table.choices


def reset() -> None:
    """Forget every installed and opened table (tests; a process that re-tunes)."""
    TABLES.clear()
    _OPENED.clear()


def choose(weights: ExpertView, x: torch.Tensor) -> str:
    """The path for a min-max expert on its rows x [n, H]: the device's table, else the default."""
    rows = x.shape[0]
    table = TABLES.get(x.device)
    if table is not None:
        bits = weights.bits
        paths = table.get((bits, weights.group, x.shape[1], weights.tensors["down.q"].shape[1] * 8 // bits, x.dtype))
        if paths is not None:
            return paths[min((rows - 1).bit_length(), _LAST)]
    return DECODE if rows <= DECODE_ROWS else "grouped_mma"


def expert_ffn(weights: ExpertView, x: torch.Tensor) -> torch.Tensor:
    """A min-max expert on x [n, H] through the path `choose` picks, in x's dtype."""
    return PATHS[choose(weights, x)](weights.tensors, weights.bits, weights.group, x)


def lookup(device: torch.device, bits: int, group: int, hidden: int, inter: int, dtype: torch.dtype,
           rows: int) -> str | None:
    """The installed table's path for these, or None where it has no entry (benches report it)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    paths = TABLES.get(device, {}).get((bits, group, hidden, inter, dtype))
    return None if paths is None else paths[bucket(rows)]


# ---- the table file -------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The name a table is kept under: the GPU's (torch.cuda.get_device_name); "cpu" for the CPU
    emulator of the kernels (tests/emu), whose timings mean nothing but whose mechanism is real."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def table_file(name: str, folder: Path | None = None) -> Path:
    """$MOEFLOW_CACHE (else ~/.cache/moeflow)/kernels-<name, sanitized>.json."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "device"
    return (folder if folder is not None else user_cache_dir()) / f"kernels-{safe}.json"


def _fail(path: Path, field: str, why: str) -> KernelTableError:
    return KernelTableError(f"{path}: field {field!r}: {why} (tune again with `python benches/bench_kernels.py "
                            f"--tune`, or delete the file to run untuned)", path=str(path), field=field)


def _int(doc: dict[str, Any], name: str, path: Path, where: str, allowed: tuple[int, ...] | None = None) -> int:
    value = doc.get(name)
    if type(value) is not int or value <= 0 or (allowed is not None and value not in allowed):
        want = f"one of {list(allowed)}" if allowed else "a positive integer"
        raise _fail(path, f"{where}{name}", f"{value!r} is not {want}")
    return value


def parse(doc: Any, path: Path) -> KernelTable:
    """A table from its JSON document, every field checked; KernelTableError names the first bad one."""
    if not isinstance(doc, dict):
        raise _fail(path, "(top level)", f"a table is a JSON object, not {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise _fail(path, "format", f"{doc.get('format')!r} is not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise _fail(path, "version", f"{doc.get('version')!r}: this moeflow reads version {VERSION}")
    if not isinstance(doc.get("device"), str) or not doc["device"]:
        raise _fail(path, "device", f"{doc.get('device')!r} is not a device name")
    if doc.get("buckets") != list(BUCKETS):
        raise _fail(path, "buckets", f"{doc.get('buckets')!r} is not {list(BUCKETS)}")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise _fail(path, "entries", f"a list of entries, not {type(entries).__name__}")
    choices: dict[Key, tuple[str, ...]] = {}
    for i, entry in enumerate(entries):
        where = f"entries[{i}]."
        if not isinstance(entry, dict):
            raise _fail(path, f"entries[{i}]", f"an object, not {type(entry).__name__}")
        if entry.get("kind") != "minmax":
            raise _fail(path, f"{where}kind", f"{entry.get('kind')!r}: tables choose paths of 'minmax' experts")
        bits = _int(entry, "bits", path, where, QUANT_BITS)
        group, hidden, inter = (_int(entry, name, path, where) for name in ("group", "hidden", "inter"))
        dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise _fail(path, f"{where}dtype", f"{entry.get('dtype')!r} is not one of {list(DTYPES)}")
        paths = entry.get("paths")
        if not isinstance(paths, list) or len(paths) != len(BUCKETS):
            raise _fail(path, f"{where}paths", f"a list of {len(BUCKETS)} path names (one per bucket), got {paths!r}")
        for j, name in enumerate(paths):
            if name not in PATHS:
                raise _fail(path, f"{where}paths[{j}]", f"{name!r} is not one of {list(PATHS)}")
        for name in ("us", "max_err"):  # the measurements: kept for the record, not read here
            if name in entry and not isinstance(entry[name], dict):
                raise _fail(path, f"{where}{name}", f"an object of per-path lists, not {type(entry[name]).__name__}")
        key = (bits, group, hidden, inter, dtype)
        if key in choices:
            raise _fail(path, f"entries[{i}]", "a second entry for the same bits, group, hidden, inter and dtype")
        choices[key] = tuple(paths)
    return KernelTable(doc["device"], choices, path)


def load(path: Path) -> KernelTable:
    """Read and check a table file (KernelTableError naming the file and field)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KernelTableError(f"{path}: cannot read the kernel table ({e})", path=str(path), field=None) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, "(json)", f"not JSON: {e}") from e
    return parse(doc, path)


def open_for(device: torch.device, folder: Path | None = None) -> KernelTable | None:
    """The device's table from the cache folder, installed for it; None (untuned) where there is
    none. Read once per process and device: a table tuned meanwhile applies from the next process,
    so engines of one process never see their choice change under them."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device in _OPENED:
        return _OPENED[device]
    name = device_name(device)
    file = table_file(name, folder)
    table = load(file) if file.exists() else None
    if table is not None and table.device != name:
        raise _fail(file, "device", f"measured on {table.device!r}, not on this {name!r}")
    install(table, device)
    _OPENED[device] = table
    return table


def write(path: Path, doc: dict[str, Any]) -> None:
    """Write a table whole or not at all (temp file in the same folder, then rename): an engine
    opening meanwhile reads the old table or the new one, never half of one."""
    parse(doc, path)  # never write what the engine would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    partial.replace(path)

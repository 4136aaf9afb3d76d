"""Reading a Hugging Face checkpoint directory: config, safetensors shards, their headers."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeflow.errors import CheckpointError
from moeflow.models.fingerprint import checkpoint_fingerprint
from moeflow.models.hub import resolve_model

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # FP8 block-quantized checkpoints (DeepSeek-V3, Qwen3-FP8): store/fp8.py
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header; returns (header, data_start)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)", path=str(path))
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors header (header length {header_len}, file size {size})",
                    path=str(path),
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})", path=str(path)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})", path=str(path)) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)", path=str(path))
    data_start = 8 + header_len
    data_end = data_start
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has no data_offsets", path=str(path)) from e
        data_end = max(data_end, data_start + int(end))
    if data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors end at byte {data_end} but the file has {size}",
            path=str(path),
        )
    return header, data_start


class Checkpoint:
    """A checkpoint directory: its config and an index of every tensor, validated at open.

    Tensors are read lazily through safetensors' memory map; nothing is loaded here.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """`path`: a checkpoint folder, or a Hugging Face repo id in the local cache (models/hub.py)."""
        self.path = resolve_model(path)
        self.config = self._read_config()
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            header, data_start = _read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype", ""))
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}", path=str(file)
                    )
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(file, dtype, tuple(meta["shape"]), data_start + begin, data_start + end)
        self._handles: dict[Path, Any] = {}
        self._fingerprint: str | None = None

    def _read_config(self) -> dict[str, Any]:
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing config.json", path=str(cfg_path))
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable config ({e})", path=str(cfg_path)) from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: config is not a JSON object", path=str(cfg_path))
        return config

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({e})", path=str(index)) from e
            files = sorted({self.path / name for name in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: safetensors shard named in {index.name} is missing", path=str(f))
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.path}: no *.safetensors files", path=str(self.path))
        return found

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint", field=name) from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _handle(self, file: Path) -> Any:
        """The shard's open safetensors handle, opened once and kept."""
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot open ({e})", path=str(file)) from e
            self._handles[file] = handle
        return handle

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load one tensor (a copy owned by torch), optionally converted to `dtype`."""
        info = self.info(name)
        handle = self._handle(info.file)
        tensor = handle.get_tensor(name)
        if tuple(tensor.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has a corrupt shape", path=str(info.file))
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def get_part(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] of one tensor, reading only that part (one expert of a fused [E, ...] tensor)."""
        info = self.info(name)
        if not info.shape or not 0 <= index < info.shape[0]:
            raise CheckpointError(f"{info.file}: tensor {name!r} of shape {list(info.shape)} has no part {index}",
                                  path=str(info.file), field=name)
        handle = self._handle(info.file)
        return handle.get_slice(name)[index]

    def scale_inv(self, name: str) -> str | None:
        """The block-scale tensor of `name` when the checkpoint stores it FP8 (e4m3 codes beside a
        `<name>_scale_inv`); None for a tensor stored unquantized. Readers dequantize with store/fp8.py."""
        info = self.tensors.get(name)
        if info is None or info.dtype != torch.float8_e4m3fn:
            return None
        scale = f"{name}_scale_inv"
        if scale not in self.tensors:
            raise CheckpointError(f"{info.file}: FP8 tensor {name!r} has no {scale!r} beside it",
                                  path=str(info.file), field=name)
        return scale

    def expect_shape(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.info(name)
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config implies {list(shape)}",
                path=str(info.file),
                field=name,
            )
        return info

    def fingerprint(self) -> str:
        """Identity of the weights by content (config, shard headers, sampled data; see models/fingerprint.py).

        Computed once per Checkpoint: it reads about 1 MiB per shard."""
        if self._fingerprint is None:
            self._fingerprint = checkpoint_fingerprint(self.config, self.path, self.files)
        return self._fingerprint

    def close(self) -> None:
        self._handles.clear()

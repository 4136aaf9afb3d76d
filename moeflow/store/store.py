"""An expert store on disk: one data file of aligned per-expert blobs and a manifest that vouches for it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.errors import ChecksumMismatch, StoreError, TransferError
from moeflow.store.layout import BLOB_ALIGN, BlobLayout

FORMAT = "moeflow.expert-store"
VERSION = 1
MANIFEST = "manifest.json"
DATA = "experts.bin"


@dataclass(frozen=True)
class Manifest:
    fingerprint: str  # of the checkpoint the store was made from
    family: str
    layout: BlobLayout
    num_experts: int
    layers: tuple[int, ...]  # MoE layers, in order
    data_size: int
    data_mtime_ns: int
    crc32: tuple[int, ...]  # per blob, in (layer order, expert) order

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "family": self.family,
            "layout": self.layout.to_json(),
            "num_experts": self.num_experts,
            "layers": list(self.layers),
            "data_file": DATA,
            "data_size": self.data_size,
            "data_mtime_ns": self.data_mtime_ns,
            "crc32": list(self.crc32),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"format {d.get('format')!r} version {d.get('version')!r}")
        return Manifest(
            fingerprint=str(d["fingerprint"]),
            family=str(d["family"]),
            layout=BlobLayout.from_json(d["layout"]),
            num_experts=int(d["num_experts"]),
            layers=tuple(int(x) for x in d["layers"]),
            data_size=int(d["data_size"]),
            data_mtime_ns=int(d["data_mtime_ns"]),
            crc32=tuple(int(x) for x in d["crc32"]),
        )


class ExpertStore:
    """A validated store variant (one precision). Blob i of (layer, expert) is at i * layout.size."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.layout = manifest.layout
        self.data_path = path / DATA
        self._layer_pos = {layer: i for i, layer in enumerate(manifest.layers)}

    @property
    def precision(self) -> str:
        return self.layout.precision

    @property
    def blob_size(self) -> int:
        return self.layout.size

    def index(self, layer: int, expert: int) -> int:
        try:
            pos = self._layer_pos[layer]
        except KeyError:
            raise StoreError(f"{self.path}: layer {layer} has no experts in this store", path=str(self.path)) from None
        if not 0 <= expert < self.manifest.num_experts:
            raise StoreError(f"{self.path}: expert {expert} out of range", path=str(self.path))
        return pos * self.manifest.num_experts + expert

    def offset(self, layer: int, expert: int) -> int:
        return self.index(layer, expert) * self.layout.size

    def crc32(self, layer: int, expert: int) -> int:
        return self.manifest.crc32[self.index(layer, expert)]

    @staticmethod
    def read_manifest(path: Path) -> Manifest:
        """Parse a store's manifest; StoreError when absent or corrupt."""
        mpath = path / MANIFEST
        try:
            return Manifest.from_json(json.loads(mpath.read_text()))
        except FileNotFoundError:
            raise StoreError(f"{mpath}: no manifest", path=str(mpath)) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{mpath}: corrupt manifest ({e})", path=str(mpath)) from e

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> ExpertStore:
        """Open and validate a store made from the checkpoint with `fingerprint`.

        StoreError says why it cannot be used: absent, made from other weights, or its
        data file changed on disk since it was written (size or modification time).
        """
        manifest = cls.read_manifest(path)
        if manifest.fingerprint != fingerprint:
            raise StoreError(f"{path}: stale store (made from a different checkpoint)", path=str(path))
        data = path / DATA
        try:
            st = data.stat()
        except OSError as e:
            raise StoreError(f"{data}: store data file unreadable ({e.strerror})", path=str(data)) from e
        expected = manifest.num_experts * len(manifest.layers) * manifest.layout.size
        if manifest.data_size != expected or manifest.layout.size % BLOB_ALIGN:
            raise StoreError(f"{path / MANIFEST}: corrupt manifest (sizes disagree)", path=str(path / MANIFEST))
        if len(manifest.crc32) != manifest.num_experts * len(manifest.layers):
            raise StoreError(f"{path / MANIFEST}: corrupt manifest (checksum count)", path=str(path / MANIFEST))
        if st.st_size != manifest.data_size or st.st_mtime_ns != manifest.data_mtime_ns:
            raise StoreError(
                f"{data}: store file changed on disk since it was written "
                f"(size {st.st_size} vs {manifest.data_size}, mtime {st.st_mtime_ns} vs {manifest.data_mtime_ns})",
                path=str(data),
            )
        return cls(path, manifest)


def store_root(checkpoint_dir: Path, override: str | os.PathLike[str] | None) -> Path:
    """Where stores of a checkpoint live: `override`, else `<checkpoint>/.moeflow`."""
    return Path(override) if override is not None else checkpoint_dir / ".moeflow"


def describe_store_error(store: ExpertStore, key: tuple[int, int], error: BaseException) -> BaseException:
    layer, expert = key
    where = f"{store.data_path} (layer {layer}, expert {expert})"
    if isinstance(error, ChecksumMismatch):
        return StoreError(f"{where}: checksum mismatch, the store file changed on disk", path=str(store.path))
    if isinstance(error, TransferError):
        return StoreError(f"{where}: read failed: {error}", path=str(store.data_path))
    return error

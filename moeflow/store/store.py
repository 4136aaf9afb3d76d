"""An expert store on disk: one data file of aligned per-expert blobs and a manifest that vouches for it."""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.errors import ChecksumMismatch, StoreError, TransferError
from moeflow.store.manifest import DATA, Manifest, ManifestFieldError, StoreSpec, check_against, parse_manifest

MANIFEST = "manifest.json"


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
        """Parse a store's manifest and check it as a whole; StoreError naming the field when absent or corrupt."""
        mpath = path / MANIFEST
        try:
            raw = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise StoreError(f"{mpath}: no manifest", path=str(mpath)) from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"{mpath}: corrupt manifest (not readable JSON: {e})", path=str(mpath)) from e
        try:
            return parse_manifest(raw)
        except ManifestFieldError as e:
            raise StoreError(f"{mpath}: corrupt manifest: {e}", path=str(mpath)) from e

    @classmethod
    def open(cls, path: Path, fingerprint: str | None, spec: StoreSpec | None = None) -> ExpertStore:
        """Open and validate a store made from the checkpoint with `fingerprint` (None: any checkpoint).

        StoreError says why it cannot be used: absent, corrupt (naming the field), made from other
        weights, disagreeing with `spec` (what the checkpoint implies), or its data file changed on
        disk since it was written (size or modification time).
        """
        manifest = cls.read_manifest(path)
        if fingerprint is not None and manifest.fingerprint != fingerprint:
            raise StoreError(
                f"{path}: stale store (made from a different checkpoint: fingerprint {manifest.fingerprint}, "
                f"the checkpoint's is {fingerprint})",
                path=str(path),
            )
        if spec is not None:
            try:
                check_against(manifest, spec)
            except ManifestFieldError as e:
                raise StoreError(
                    f"{path / MANIFEST}: manifest disagrees with the checkpoint: {e}", path=str(path / MANIFEST)
                ) from e
        data = path / DATA
        try:
            st = data.stat()
        except OSError as e:
            raise StoreError(f"{data}: store data file unreadable ({e.strerror})", path=str(data)) from e
        if st.st_size != manifest.data_size or st.st_mtime_ns != manifest.data_mtime_ns:
            raise StoreError(
                f"{data}: store file changed on disk since it was written "
                f"(size {st.st_size} vs {manifest.data_size}, mtime {st.st_mtime_ns} vs {manifest.data_mtime_ns})",
                path=str(data),
            )
        return cls(path, manifest)


def describe_store_error(store: ExpertStore, key: tuple[int, int], error: BaseException) -> BaseException:
    layer, expert = key
    where = f"{store.data_path} (layer {layer}, expert {expert})"
    if isinstance(error, ChecksumMismatch):
        return StoreError(f"{where}: checksum mismatch, the store file changed on disk", path=str(store.path))
    if isinstance(error, TransferError):
        return StoreError(f"{where}: read failed: {error}", path=str(store.data_path))
    return error

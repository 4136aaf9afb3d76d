"""Full check of a store against its manifest and its checkpoint: every blob's checksum and bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pathlib import Path

from moeflow import _core
from moeflow.errors import StoreError
from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.store.codecs import Codec
from moeflow.store.convert import encode_blob, store_spec
from moeflow.store.manifest import ManifestFieldError, check_against
from moeflow.store.store import MANIFEST, ExpertStore


@dataclass
class VerifyReport:
    """What `verify_store` found: mismatches are (layer, expert, what) triples."""

    store: str
    precision: str
    blobs: int = 0
    fingerprint_ok: bool = True
    data_file_note: str | None = None  # its size or time differs from the manifest's (the blobs decide)
    checksum_mismatches: list[tuple[int, int]] = field(default_factory=list)
    content_mismatches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fingerprint_ok and not self.checksum_mismatches and not self.content_mismatches

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"{self.store} ({self.precision}): {self.blobs} blobs checked: {'OK' if self.ok else 'MISMATCH'}"]
        if not self.fingerprint_ok:
            out.append("  checkpoint fingerprint differs from the one the store was made from")
        if self.data_file_note:
            out.append(f"  {self.data_file_note}")
        for what, items in (
            ("checksum differs from the manifest", self.checksum_mismatches),
            ("bytes differ from the checkpoint's tensors re-encoded", self.content_mismatches),
        ):
            for layer, expert in items[:limit]:
                out.append(f"  layer {layer} expert {expert}: {what}")
            if len(items) > limit:
                out.append(f"  ... and {len(items) - limit} more: {what}")
        return out


def open_for_verify(path: Path, arch: Arch, codec: Codec) -> ExpertStore:
    """The store at `path` with its manifest checked as a whole, whatever checkpoint or file time it has."""
    manifest = ExpertStore.read_manifest(path)
    try:
        check_against(manifest, store_spec(arch, codec))
    except ManifestFieldError as e:
        raise StoreError(f"{path / MANIFEST}: manifest disagrees with the checkpoint: {e}", path=str(path)) from e
    return ExpertStore(path, manifest)


def verify_store(ckpt: Checkpoint, arch: Arch, codec: Codec, store: ExpertStore) -> VerifyReport:
    """Read every blob of `store` once: its CRC against the manifest, its bytes against the checkpoint."""
    spec = store_spec(arch, codec)
    report = VerifyReport(str(store.path), store.precision)
    report.fingerprint_ok = store.manifest.fingerprint == ckpt.fingerprint()
    st = store.data_path.stat()
    if (st.st_size, st.st_mtime_ns) != (store.manifest.data_size, store.manifest.data_mtime_ns):
        report.data_file_note = (
            f"{store.data_path}: size {st.st_size} and time {st.st_mtime_ns} differ from the manifest's "
            f"({store.manifest.data_size}, {store.manifest.data_mtime_ns}): the file changed after it was written"
        )
    fd = os.open(store.data_path, os.O_RDONLY)
    try:
        for layer in spec.layers:
            for expert in range(spec.num_experts):
                blob = os.pread(fd, store.blob_size, store.offset(layer, expert))
                report.blobs += 1
                if len(blob) != store.blob_size or _core.crc32(blob) != store.crc32(layer, expert):
                    report.checksum_mismatches.append((layer, expert))
                expected = encode_blob(ckpt, arch, codec, spec.layout, layer, expert)
                if blob != expected.tobytes():
                    report.content_mismatches.append((layer, expert))
    finally:
        os.close(fd)
    return report

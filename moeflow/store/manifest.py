"""The store manifest: its JSON form, checked as a whole (types, sizes, blob bounds) and against the checkpoint.

A manifest that fails a check is never trusted in part: a wrong slot offset or dtype would make
every load of that expert fail (or, worse, read the wrong bytes), so the whole store is refused
with a StoreError naming the first bad field, and store_mode="auto" rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeflow.store.layout import BLOB_ALIGN, DTYPES, BlobLayout, Slot

FORMAT = "moeflow.expert-store"
VERSION = 1
DATA = "experts.bin"


class ManifestFieldError(ValueError):
    """One field of a manifest is wrong: `field` is its dotted path, the message says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")
        self.field = field


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
    def from_json(d: object) -> Manifest:
        """Parse and check a decoded manifest; ManifestFieldError names the first bad field."""
        return parse_manifest(d)


@dataclass(frozen=True)
class StoreSpec:
    """What the checkpoint and codec imply a store must hold."""

    family: str
    layout: BlobLayout
    num_experts: int
    layers: tuple[int, ...]


def _get(d: dict[str, Any], field: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    name = f"{where}{field}"
    if field not in d:
        raise ManifestFieldError(name, "is missing")
    value = d[field]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestFieldError(name, f"is {type(value).__name__} {_short(value)}, expected {expected}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(d: dict[str, Any], field: str, where: str = "", *, low: int = 0) -> int:
    value: int = _get(d, field, int, where)
    if value < low:
        raise ManifestFieldError(f"{where}{field}", f"is {value}, expected at least {low}")
    return value


def _int_list(d: dict[str, Any], field: str) -> list[int]:
    values = _get(d, field, list)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ManifestFieldError(f"{field}[{i}]", f"is {_short(v)}, expected a non-negative integer")
    return values


def _slot(d: object, where: str, blob_size: int) -> Slot:
    if not isinstance(d, dict):
        raise ManifestFieldError(where.rstrip("."), f"is {type(d).__name__}, expected an object")
    name = _get(d, "name", str, where)
    dtype = _get(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise ManifestFieldError(f"{where}dtype", f"is {dtype!r}, expected one of {', '.join(DTYPES)}")
    shape = _get(d, "shape", list, where)
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in shape):
        raise ManifestFieldError(f"{where}shape", f"is {_short(shape)}, expected positive integers")
    offset = _int(d, "offset", where)
    slot = Slot(name, dtype, tuple(shape), offset)
    if offset % DTYPES[dtype].itemsize:
        raise ManifestFieldError(f"{where}offset", f"{offset} is not aligned to its {dtype} elements")
    if offset + slot.nbytes > blob_size:
        raise ManifestFieldError(
            f"{where}offset", f"{offset} + {slot.nbytes} bytes of {name!r} runs past the blob size {blob_size}"
        )
    return slot


def _layout(d: object) -> BlobLayout:
    if not isinstance(d, dict):
        raise ManifestFieldError("layout", f"is {type(d).__name__}, expected an object")
    precision = _get(d, "precision", str, "layout.")
    size = _int(d, "size", "layout.", low=1)
    if size % BLOB_ALIGN:
        raise ManifestFieldError("layout.size", f"is {size}, not a multiple of {BLOB_ALIGN}")
    raw_slots = _get(d, "slots", list, "layout.")
    if not raw_slots:
        raise ManifestFieldError("layout.slots", "is empty")
    slots = [_slot(s, f"layout.slots[{i}].", size) for i, s in enumerate(raw_slots)]
    names = [s.name for s in slots]
    if len(set(names)) != len(names):
        raise ManifestFieldError("layout.slots", f"names a tensor twice ({names})")
    ordered = sorted(range(len(slots)), key=lambda i: slots[i].offset)
    for a, b in zip(ordered, ordered[1:]):
        if slots[a].offset + slots[a].nbytes > slots[b].offset:
            raise ManifestFieldError(f"layout.slots[{b}].offset", f"overlaps slot {slots[a].name!r}")
    meta = d.get("meta", {})
    if not isinstance(meta, dict) or any(
        not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) for k, v in meta.items()
    ):
        raise ManifestFieldError("layout.meta", f"is {_short(meta)}, expected names mapped to integers")
    return BlobLayout(precision, tuple(slots), size, tuple(sorted(meta.items())))


def parse_manifest(d: object) -> Manifest:
    """A Manifest from decoded JSON, every field checked: types, blob and slot bounds, counts."""
    if not isinstance(d, dict):
        raise ManifestFieldError("(top level)", f"is {type(d).__name__} {_short(d)}, expected a JSON object")
    if d.get("format") != FORMAT:
        raise ManifestFieldError("format", f"is {_short(d.get('format'))}, expected {FORMAT!r}")
    if d.get("version") != VERSION:
        raise ManifestFieldError("version", f"is {_short(d.get('version'))}, expected {VERSION}")
    if d.get("data_file", DATA) != DATA:
        raise ManifestFieldError("data_file", f"is {_short(d.get('data_file'))}, expected {DATA!r}")
    layout = _layout(d.get("layout"))
    num_experts = _int(d, "num_experts", low=1)
    layers = _int_list(d, "layers")
    if not layers or any(a >= b for a, b in zip(layers, layers[1:])):
        raise ManifestFieldError("layers", f"is {_short(layers)}, expected increasing layer indices")
    blobs = num_experts * len(layers)
    data_size = _int(d, "data_size")
    if data_size != blobs * layout.size:
        raise ManifestFieldError(
            "data_size", f"is {data_size}, but {blobs} blobs of {layout.size} bytes need {blobs * layout.size}"
        )
    crc32 = _int_list(d, "crc32")
    if len(crc32) != blobs:
        raise ManifestFieldError("crc32", f"has {len(crc32)} checksums for {blobs} blobs")
    if any(c >= 1 << 32 for c in crc32):
        raise ManifestFieldError("crc32", "holds a value above 32 bits")
    return Manifest(
        fingerprint=_get(d, "fingerprint", str),
        family=_get(d, "family", str),
        layout=layout,
        num_experts=num_experts,
        layers=tuple(layers),
        data_size=data_size,
        data_mtime_ns=_int(d, "data_mtime_ns"),
        crc32=tuple(crc32),
    )


def check_against(manifest: Manifest, spec: StoreSpec) -> None:
    """ManifestFieldError naming the first field where the store disagrees with what the checkpoint implies."""
    want, got = spec.layout, manifest.layout
    pairs: list[tuple[str, object, object]] = [
        ("family", manifest.family, spec.family),
        ("num_experts", manifest.num_experts, spec.num_experts),
        ("layers", list(manifest.layers), list(spec.layers)),
        ("layout.precision", got.precision, want.precision),
        ("layout.meta", dict(got.meta), dict(want.meta)),
        ("layout.size", got.size, want.size),
        ("layout.slots", len(got.slots), len(want.slots)),
    ]
    for field, have, expected in pairs:
        if have != expected:
            raise ManifestFieldError(field, f"is {_short(have)}, the checkpoint implies {_short(expected)}")
    for i, (g, w) in enumerate(zip(got.slots, want.slots)):
        for field in ("name", "dtype", "shape", "offset"):
            have, expected = getattr(g, field), getattr(w, field)
            if have != expected:
                raise ManifestFieldError(
                    f"layout.slots[{i}].{field}", f"is {_short(have)}, the checkpoint implies {_short(expected)}"
                )

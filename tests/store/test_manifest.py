"""The manifest is checked as a whole at open: every bad field is a StoreError naming it; 'auto' rebuilds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moeflow import Engine, _core
from moeflow.errors import StoreError
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import codec_for, open_or_convert, store_spec
from moeflow.store.convert import encode_blob

Edit = Callable[[Any], Any]


def _set(path: str, value: object) -> Edit:
    """An edit setting the dotted `path` (list indices as numbers) to `value`, or to value(old) when callable."""

    def edit(m: Any) -> Any:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = m
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value
        return m

    return edit


CASES: list[tuple[str, Edit, str]] = [
    ("list", lambda m: [], "(top level)"),
    ("null", lambda m: None, "(top level)"),
    ("string", lambda m: "manifest", "(top level)"),
    ("no format", lambda m: {k: v for k, v in m.items() if k != "format"}, "format"),
    ("layout missing", lambda m: {k: v for k, v in m.items() if k != "layout"}, "layout"),
    ("slot offset moved", _set("layout.slots.1.offset", lambda v: v + 64), "layout.slots[1].offset"),
    ("slot offset unaligned", _set("layout.slots.1.offset", lambda v: v + 2), "layout.slots[1].offset"),
    ("slot past blob end", _set("layout.slots.1.offset", lambda v: v + (1 << 20)), "layout.slots[1].offset"),
    ("slots overlap", _set("layout.slots.1.offset", 0), "layout.slots[1].offset"),
    ("slot dtype", _set("layout.slots.0.dtype", "float16"), "layout.slots[0].dtype"),
    ("slot dtype unknown", _set("layout.slots.0.dtype", "float64"), "layout.slots[0].dtype"),
    ("slot shape", _set("layout.slots.0.shape", lambda v: [v[1], v[0]]), "layout.slots[0].shape"),
    ("slot shape negative", _set("layout.slots.0.shape", [-1, 4]), "layout.slots[0].shape"),
    ("slot name", _set("layout.slots.0.name", "down"), "layout.slots"),
    ("no slots", _set("layout.slots", []), "layout.slots"),
    ("codec precision", _set("layout.precision", "int8"), "layout.precision"),
    ("codec meta", _set("layout.meta", {"bits": 4, "group": 64}), "layout.meta"),
    ("blob size unaligned", _set("layout.size", lambda v: v + 1), "layout.size"),
    ("family", _set("family", "mixtral"), "family"),
    ("num_experts type", _set("num_experts", "6"), "num_experts"),
    ("num_experts bool", _set("num_experts", True), "num_experts"),
    ("layers out of order", _set("layers", lambda v: list(reversed(v)) + [99]), "layers"),
    ("layers other indices", _set("layers", lambda v: [x + 10 for x in v]), "layers"),
    ("blobs past the file", _set("data_size", lambda v: v * 2), "data_size"),
    ("checksums missing", _set("crc32", lambda v: v[:-1]), "crc32"),
    ("checksum not int", _set("crc32", lambda v: ["x"] + v[1:]), "crc32[0]"),
    ("checksum too big", _set("crc32", lambda v: [1 << 40] + v[1:]), "crc32"),
    ("data file", _set("data_file", "../../etc/passwd"), "data_file"),
]


@pytest.fixture
def model(hf_checkpoints, tmp_path: Path):  # type: ignore[no-untyped-def]
    ckpt = Checkpoint(hf_checkpoints.path("qwen2_moe"))
    return ckpt, parse_arch(ckpt), tmp_path / "stores"


@pytest.mark.parametrize(("case", "edit", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_manifest_field_is_named_refused_by_never_and_rebuilt_by_auto(model, case, edit, field) -> None:  # type: ignore[no-untyped-def]
    ckpt, arch, root = model
    codec = codec_for("float32")
    store = open_or_convert(ckpt, arch, codec, root, progress=False)
    mpath = store.path / "manifest.json"
    mpath.write_text(json.dumps(edit(json.loads(mpath.read_text()))))
    with pytest.raises(StoreError) as refused:
        open_or_convert(ckpt, arch, codec, root, mode="never", progress=False)
    assert f"field {field!r}" in str(refused.value)
    assert "store_mode='never'" in str(refused.value)
    rebuilt = open_or_convert(ckpt, arch, codec, root, progress=False)
    assert json.loads(mpath.read_text())["crc32"] == list(rebuilt.manifest.crc32)
    data = rebuilt.data_path.read_bytes()
    spec = store_spec(arch, codec)
    for layer in arch.moe_layers:
        for e in range(arch.num_experts):
            blob = data[rebuilt.offset(layer, e) : rebuilt.offset(layer, e) + rebuilt.blob_size]
            assert _core.crc32(blob) == rebuilt.crc32(layer, e)
            assert blob == encode_blob(ckpt, arch, codec, spec.layout, layer, e).tobytes()


@pytest.mark.asyncio
@pytest.mark.parametrize("content", ["[]", "null"])
async def test_engine_with_a_non_object_manifest_is_a_store_error_or_a_rebuild(hf_checkpoints, tmp_path: Path, content: str) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("mixtral")
    store_dir = tmp_path / "stores"
    async with Engine.open(path, device="cpu", store_dir=str(store_dir)) as eng:
        before = (await eng.generate([5, 17, 42], 4)).tokens
    manifest = next(store_dir.glob("*/manifest.json"))
    manifest.write_text(content)
    with pytest.raises(StoreError, match="expected a JSON object"):
        await Engine.open(path, device="cpu", store_dir=str(store_dir), store_mode="never")
    async with Engine.open(path, device="cpu", store_dir=str(store_dir)) as eng:
        assert (await eng.generate([5, 17, 42], 4)).tokens == before
    assert json.loads(manifest.read_text())["format"] == "moeflow.expert-store"

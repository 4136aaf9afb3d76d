"""runtime/kernel_choice.py and kernel_tune.py: each path of a min-max expert against the torch
reference (on the CPU emulator of the kernels, and on the GPU where there is one), the row
buckets, the table file (valid, malformed, per device), and the tuner writing a table."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow.errors import KernelTableError
from moeflow.runtime import kernel_choice, kernel_tune, moe, reference
from moeflow.runtime.kernel_choice import BUCKETS, PATHS
from moeflow.store.layout import ExpertView
from tests.runtime.test_kernels import _expert


@pytest.fixture(autouse=True)
def no_tables() -> Iterator[None]:
    kernel_choice.reset()
    yield
    kernel_choice.reset()


def _view(w: dict[str, torch.Tensor], bits: int, group: int) -> ExpertView:
    return ExpertView(w, bits, group, sum(t.nbytes for t in w.values()), kind="minmax")


def _doc(paths: list[str] | None = None, **entry: Any) -> dict[str, Any]:
    base = {"kind": "minmax", "bits": 4, "group": 64, "hidden": 128, "inter": 64, "dtype": "bfloat16",
            "paths": paths or ["moe_decode"] * len(BUCKETS)}
    return {"format": kernel_choice.FORMAT, "version": kernel_choice.VERSION, "device": "cpu",
            "buckets": list(BUCKETS), "entries": [{**base, **entry}]}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_each_path_matches_the_reference(path: str, bits: int, kernel_device: torch.device) -> None:
    # rows on both sides of the decode kernel's 8-row register block and the untuned 16-row edge
    hidden, inter, group = 128, 64, 64
    w = {k: v.to(kernel_device) for k, v in _expert(hidden, inter, bits, group, bits).items()}
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 9, 17):
        x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
        want = reference.quantized_expert_ffn(x.float(), _expert(hidden, inter, bits, group, bits), bits, group)
        got = PATHS[path](w, bits, group, x.to(kernel_device))
        assert got.dtype == torch.bfloat16 and got.shape == (rows, hidden)
        torch.testing.assert_close(got.cpu().float(), want, rtol=3e-2, atol=3e-3)


def test_the_dequant_path_takes_float16(kernel_device: torch.device) -> None:
    w = {k: v.to(kernel_device) for k, v in _expert(128, 64, 4, 64, 5).items()}
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    got = PATHS["dequant_torch"](w, 4, 64, x.to(kernel_device))
    want = reference.quantized_expert_ffn(x.float(), _expert(128, 64, 4, 64, 5), 4, 64)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.cpu().float(), want, rtol=3e-2, atol=3e-3)


def test_buckets_cover_every_row_count() -> None:
    for rows in range(1, 700):
        i = kernel_choice.bucket(rows)
        if rows > BUCKETS[-2]:
            assert i == len(BUCKETS) - 1, rows
        else:
            assert BUCKETS[i] >= rows and (i == 0 or BUCKETS[i - 1] < rows), rows


def test_without_a_table_the_choice_is_the_engines_untuned_one() -> None:
    assert kernel_choice.DECODE_ROWS is moe.DECODE_ROWS
    w = _view(_expert(128, 64, 4, 64, 0), 4, 64)
    for rows in (1, 16, 17, 600):
        x = torch.zeros(rows, 128, dtype=torch.bfloat16)
        assert kernel_choice.choose(w, x) == ("moe_decode" if rows <= 16 else "grouped_mma")
        assert kernel_choice.default_path(rows) == kernel_choice.choose(w, x)


def test_an_installed_table_picks_by_shape_dtype_and_bucket(tmp_path: Path) -> None:
    paths = ["dequant_torch", "moe_decode", "grouped_mma"] + ["dequant_torch"] * (len(BUCKETS) - 3)
    table = kernel_choice.parse(_doc(paths), tmp_path / "t.json")
    cpu = torch.device("cpu")
    kernel_choice.install(table, cpu)
    w = _view(_expert(128, 64, 4, 64, 0), 4, 64)
    got = [kernel_choice.choose(w, torch.zeros(n, 128, dtype=torch.bfloat16)) for n in (1, 2, 3, 4, 5, 300)]
    assert got == ["dequant_torch", "moe_decode", "grouped_mma", "grouped_mma", "dequant_torch", "dequant_torch"]
    # another dtype, group or shape has no entry: the untuned choice
    assert kernel_choice.choose(w, torch.zeros(1, 128, dtype=torch.float16)) == "moe_decode"
    assert kernel_choice.choose(_view(_expert(128, 64, 4, 32, 0), 4, 32), torch.zeros(1, 128,
                                                                                      dtype=torch.bfloat16)) == "moe_decode"
    assert kernel_choice.lookup(cpu, 4, 64, 128, 64, torch.bfloat16, 1) == "dequant_torch"
    assert kernel_choice.lookup(cpu, 8, 64, 128, 64, torch.bfloat16, 1) is None
    kernel_choice.install(None, cpu)
    assert not kernel_choice.TABLES


def _mutations() -> list[tuple[str, Any, str]]:
    """(what, how the document or text is broken, the field the error must name)."""
    def entry(**kw: Any) -> dict[str, Any]:
        return _doc(**kw)

    unknown = ["moe_decode"] * len(BUCKETS)
    unknown[3] = "cutlass_fp4"
    doubled = _doc()
    doubled["entries"].append(copy.deepcopy(doubled["entries"][0]))
    return [
        ("bad json", '{"format": "moeflow-kernel-table", ', "(json)"),
        ("not an object", [], "(top level)"),
        ("format", {**_doc(), "format": "vllm"}, "format"),
        ("version", {**_doc(), "version": 2}, "version"),
        ("buckets", {**_doc(), "buckets": [1, 2, 4]}, "buckets"),
        ("entries type", {**_doc(), "entries": {"a": 1}}, "entries"),
        ("unknown path", entry(paths=unknown), "entries[0].paths[3]"),
        ("paths length", entry(paths=["moe_decode"] * 3), "entries[0].paths"),
        ("bits as text", entry(bits="4"), "entries[0].bits"),
        ("bits as bool", entry(bits=True), "entries[0].bits"),
        ("bits 3", entry(bits=3), "entries[0].bits"),
        ("hidden float", entry(hidden=128.0), "entries[0].hidden"),
        ("dtype", entry(dtype="float32"), "entries[0].dtype"),
        ("kind", entry(kind="mxfp4"), "entries[0].kind"),
        ("us type", entry(us=[1.0]), "entries[0].us"),
        ("duplicate", doubled, "entries[1]"),
    ]


@pytest.mark.parametrize(("what", "broken", "field"), _mutations(), ids=[m[0] for m in _mutations()])
def test_a_malformed_table_names_its_file_and_field(what: str, broken: Any, field: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path))
    file = kernel_choice.table_file("cpu")
    file.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(KernelTableError) as raised:
        kernel_choice.open_for(torch.device("cpu"))
    assert raised.value.path == str(file) and raised.value.field == field, what
    assert str(file) in str(raised.value) and repr(field) in str(raised.value)
    assert not kernel_choice.TABLES  # nothing half-installed


def test_the_table_of_the_device_is_found_and_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert kernel_choice.table_file("NVIDIA H200 (MIG 1g.18gb)") == tmp_path / "kernels-NVIDIA-H200-MIG-1g.18gb.json"
    assert kernel_choice.open_for(cpu) is None and not kernel_choice.TABLES  # no file: untuned
    kernel_choice.reset()
    file = kernel_choice.table_file("cpu")
    kernel_choice.write(file, _doc(["grouped_mma"] * len(BUCKETS)))
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed onto the table
    table = kernel_choice.open_for(cpu)
    assert table is not None and table.path == file and cpu in kernel_choice.TABLES
    file.write_text("not json")  # a process reads its table once: engines never see it change
    assert kernel_choice.open_for(cpu) is table
    kernel_choice.reset()
    kernel_choice.write(file, {**_doc(), "device": "NVIDIA H100 80GB HBM3"})  # copied from another GPU
    with pytest.raises(KernelTableError, match="measured on 'NVIDIA H100 80GB HBM3'") as raised:
        kernel_choice.open_for(cpu)
    assert raised.value.field == "device"


def test_a_table_the_engine_would_refuse_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(KernelTableError):
        kernel_choice.write(tmp_path / "t.json", _doc(["fastest"] * len(BUCKETS)))
    assert not list(tmp_path.iterdir())


def _check_entry(entry: dict[str, Any]) -> None:
    """Every path timed and checked at every bucket; the choice the fastest within tolerance."""
    for i in range(len(kernel_choice.BUCKETS)):  # the module's: a test may cut them (few_buckets)
        timed = {p: entry["us"][p][i] for p in PATHS}
        assert all(t is not None and math.isfinite(t) and t > 0 for t in timed.values()), timed
        errs = {p: entry["max_err"][p][i] for p in PATHS}
        ok = [p for p in PATHS if errs[p] is not None and errs[p] <= kernel_tune.TOLERANCE]
        assert entry["paths"][i] == min(ok, key=timed.__getitem__)


def test_the_tuner_writes_a_table_the_engine_loads(kernel_device: torch.device, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, few_buckets: tuple[int, ...]) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("the GPU's own tuner run is test_the_tuner_times_every_path_on_the_gpu")
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path))
    file = kernel_choice.table_file("cpu")
    file.write_text("{broken")
    lines: list[dict[str, Any]] = []
    # 64 x 64: the smallest expert both kernels take (their 64-wide K step); times mean nothing here
    written, failed = kernel_tune.tune([(64, 64)], [4], 64, [torch.bfloat16], kernel_device, reps=1, warmup=0,
                                       emit=lines.append)
    assert written == file and failed == 0
    assert lines[0]["note"].startswith("replacing an unreadable table")
    assert lines[1]["table"] == str(file) and lines[1]["paths"] == json.loads(file.read_text())["entries"][0]["paths"]
    # a second run adds its entry and keeps the others (one of the same key would be replaced)
    kernel_tune.tune([(64, 64)], [2], 64, [torch.bfloat16], kernel_device, reps=1, warmup=0)
    doc = json.loads(file.read_text())
    assert doc["device"] == "cpu" and [e["bits"] for e in doc["entries"]] == [4, 2]
    for entry in doc["entries"]:
        _check_entry(entry)
    table = kernel_choice.open_for(kernel_device)
    assert table is not None and len(table.choices) == 2


def test_a_path_that_fails_is_reported_and_never_chosen(kernel_device: torch.device,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("emulator only: the failure is made up")

    def wrong(w: dict[str, torch.Tensor], bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
        return PATHS["moe_decode"](w, bits, group, x) * 2  # fast and wrong

    def broken(w: dict[str, torch.Tensor], bits: int, group: int, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setitem(PATHS, "wrong", wrong)
    monkeypatch.setitem(PATHS, "broken", broken)
    monkeypatch.setattr(kernel_choice, "BUCKETS", (1, 2))
    monkeypatch.setattr(kernel_tune, "BUCKETS", (1, 2))
    entry = kernel_tune.measure(64, 64, 4, 64, torch.bfloat16, kernel_device, reps=1, warmup=0,
                                paths=("wrong", "broken", "grouped_mma"))
    assert entry["paths"] == ["grouped_mma", "grouped_mma"]
    assert entry["max_err"]["wrong"][0] > 0.5 and entry["us"]["broken"] == [None, None]
    assert "no kernel image" in entry["failures"]["broken"]
    with pytest.raises(RuntimeError, match="no path within"):
        kernel_tune.measure(64, 64, 4, 64, torch.bfloat16, kernel_device, reps=1, warmup=0, paths=("wrong",))


@pytest.mark.gpu
def test_the_tuner_times_every_path_on_the_gpu(tmp_path: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    file = tmp_path / "table.json"
    lines: list[dict[str, Any]] = []
    _, failed = kernel_tune.tune([(1024, 512)], [4, 8], 64, [torch.bfloat16], device, reps=3, warmup=1, file=file,
                                 emit=lines.append)
    assert failed == 0, lines
    doc = json.loads(file.read_text())
    assert doc["device"] == torch.cuda.get_device_name(device)
    for entry in doc["entries"]:
        _check_entry(entry)
        assert entry["copies"] >= 2  # 1024 x 512 experts are far smaller than an L2 cache
    table = kernel_choice.load(file)
    kernel_choice.install(table, device)
    w = kernel_tune.make_experts(1024, 512, 4, 64, 1, device)[0]
    view = _view(w, 4, 64)
    for rows in (1, 40, 600):  # the engine's call is the chosen path's, bit for bit
        x = torch.randn(rows, 1024, device=device).to(torch.bfloat16)
        chosen = kernel_choice.choose(view, x)
        assert chosen == table.choices[(4, 64, 1024, 512, torch.bfloat16)][kernel_choice.bucket(rows)]
        assert torch.equal(moe.expert_ffn(view, x), PATHS[chosen](w, 4, 64, x))

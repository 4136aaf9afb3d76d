"""A measured kernel table (runtime/kernel_choice.py) inside the engine: an int4 Mixtral on the GPU
path's kernels, run by the CPU emulator (tests/emu) as test_emulated_gpu_path.py does. Whatever
path a table forces, and a table mixing paths by row bucket, the logits are the same bits at the
smallest, a middle and the full budget; a table of the untuned choices, or one for other shapes
only, gives the untuned bits. On a GPU, the engine reads the table of its device at open."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from moeflow import Engine
from moeflow.errors import KernelTableError
from moeflow.runtime import gpu_decode, kernel_choice, moe
from moeflow.runtime.kernel_choice import BUCKETS, FORMAT, PATHS, VERSION
from tests import emu
from tests.hf_models import save_tiny

pytestmark = pytest.mark.skipif(emu.unavailable() is not None, reason=str(emu.unavailable()))

PROMPT = [(7 * i + 3) % 90 + 1 for i in range(40)]  # 40 tokens: experts get 1 to ~30 rows in prefill
HIDDEN = INTER = 128


@pytest.fixture(autouse=True)
def no_tables() -> Iterator[None]:
    kernel_choice.reset()
    yield
    kernel_choice.reset()


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # sizes both kernels take: multiples of 64 (the tensor cores' K step) and 32 (an int4 chunk)
    return save_tiny("mixtral", tmp_path_factory.mktemp("kc") / "mixtral", hidden_size=HIDDEN,
                     intermediate_size=INTER, num_local_experts=4, num_attention_heads=4, num_key_value_heads=2)


def _doc(paths: list[str], device: str = "cpu", hidden: int = HIDDEN) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "device": device, "buckets": list(BUCKETS),
            "entries": [{"kind": "minmax", "bits": 4, "group": 64, "hidden": hidden, "inter": INTER,
                         "dtype": "bfloat16", "paths": paths}]}


def _install(paths: list[str], hidden: int = HIDDEN, tmp: Path = Path("table.json")) -> None:
    kernel_choice.install(kernel_choice.parse(_doc(paths, hidden=hidden), tmp), torch.device("cpu"))


async def _run(path: Path, budget: float | str | None,
               device: Literal["cpu", "cuda"] = "cpu") -> tuple[torch.Tensor, list[int]]:
    if budget == "smallest":  # the top-k of one layer
        async with Engine.open(path, device=device, dtype="bfloat16", precision="int4-g64") as eng:
            budget = eng.plan.min_budget_bytes
    async with Engine.open(path, device=device, dtype="bfloat16", precision="int4-g64",
                           expert_budget=budget) as eng:
        # the first pass loads the experts; where they all fit, the second finds them resident
        # (layer_launch's one-launch path), and a 3-token prompt gives experts decode-sized rows
        first = await eng.logits(PROMPT)
        logits = torch.cat([first, await eng.logits(PROMPT), await eng.logits(PROMPT[:3])])
        tokens = (await eng.generate(PROMPT[:6], 8)).tokens
    return logits.cpu(), tokens


def _count_paths(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[str], list[int]]:
    """Rows each path computed, and the experts of every moe_decode launch (more than one: layer_launch)."""
    rows: Counter[str] = Counter()
    launches: list[int] = []
    for name, fn in list(PATHS.items()):
        def counted(w: Any, bits: int, group: int, x: torch.Tensor, fn: Any = fn, name: str = name) -> torch.Tensor:
            rows[name] += x.shape[0]
            return fn(w, bits, group, x)

        monkeypatch.setitem(PATHS, name, counted)
    real = gpu_decode.expert_rows

    def expert_rows(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                    group: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
        launches.append(len(experts))
        return real(x, offsets, experts, bits, group, row_weight)

    monkeypatch.setattr(gpu_decode, "expert_rows", expert_rows)
    return rows, launches


def _untuned_bits(model: Path) -> tuple[torch.Tensor, list[int]]:
    return asyncio.run(_run(model, None))


MIXED = ["dequant_torch", "moe_decode", "grouped_mma", "moe_decode", "dequant_torch", "grouped_mma",
         "moe_decode", "grouped_mma", "dequant_torch", "grouped_mma"]  # every edge from 1 to 64 rows changes path
FORCED = [pytest.param([p] * len(BUCKETS), id=p, marks=pytest.mark.slow) for p in PATHS]


@pytest.mark.parametrize("paths", [pytest.param(MIXED, id="mixed"), *FORCED])
def test_a_table_gives_the_same_bits_at_every_budget(paths: list[str], int4_model: Path,
                                                     kernel_device: torch.device,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("the emulator's run; on a GPU, test_the_gpu_engine_reads_its_table_at_open")
    monkeypatch.setattr(moe, "gpu_kernels", lambda x: True)
    untuned_logits, _ = _untuned_bits(int4_model)
    _install(paths)
    rows, launches = _count_paths(monkeypatch)
    results = {budget: asyncio.run(_run(int4_model, budget)) for budget in (None, 0.5, "smallest")}
    full_logits, full_tokens = results[None]
    for budget, (logits, tokens) in results.items():
        assert torch.equal(logits, full_logits), budget
        assert tokens == full_tokens, budget
    ran = {name for name, n in rows.items() if n}
    assert ran == set(paths), rows  # every path the table names for the rows that occurred ran, no other
    if set(paths) == {"moe_decode"}:  # the one-launch layer path runs where every expert takes moe_decode
        assert max(launches) > 1
    elif "moe_decode" not in paths:
        assert not launches
    # another accumulation than the untuned run: the same logits up to the kernels' rounding
    scale = untuned_logits.float().abs().max()
    assert (full_logits.float() - untuned_logits.float()).abs().max() <= 3e-2 * scale


def test_a_table_of_the_untuned_choice_or_of_other_shapes_gives_the_untuned_bits(
        int4_model: Path, kernel_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("the emulator's run")
    monkeypatch.setattr(moe, "gpu_kernels", lambda x: True)
    untuned = _untuned_bits(int4_model)
    _install([kernel_choice.default_path(b) for b in BUCKETS])
    same_choice = _untuned_bits(int4_model)
    _install(["dequant_torch"] * len(BUCKETS), hidden=2 * HIDDEN)  # an entry for another shape only
    rows, _ = _count_paths(monkeypatch)
    other_shape = _untuned_bits(int4_model)
    assert set(rows) <= {"moe_decode", "grouped_mma"}
    for logits, tokens in (same_choice, other_shape):
        assert torch.equal(logits, untuned[0]) and tokens == untuned[1]


@pytest.mark.gpu
def test_the_gpu_engine_reads_its_table_at_open(int4_model: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path))
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    file = kernel_choice.table_file(name)
    kernel_choice.write(file, _doc(MIXED, device=name))
    rows, _ = _count_paths(monkeypatch)
    results = {budget: asyncio.run(_run(int4_model, budget, "cuda")) for budget in (None, 0.5, "smallest")}
    full_logits, full_tokens = results[None]
    for budget, (logits, tokens) in results.items():
        assert torch.equal(logits, full_logits), budget
        assert tokens == full_tokens, budget
    assert {name for name, n in rows.items() if n} == set(MIXED), rows
    kernel_choice.reset()
    file.write_text('{"format": "moeflow-kernel-table", "version": 1, "device": 3}')
    with pytest.raises(KernelTableError) as raised:
        asyncio.run(_run(int4_model, None, "cuda"))
    assert raised.value.path == str(file) and raised.value.field == "device"

"""The placement cost model: which misses run on the CPU, which are copied, and the cpu_layers option."""

from __future__ import annotations

import pytest

from moeflow.config import EngineConfig
from moeflow.errors import ConfigError
from moeflow.scheduling.placement import CpuSpeed, LinkSpeed, Miss, place, resolve_cpu_layers

MIB = 1 << 20
# A Mixtral-sized expert (352 MB bf16) over PCIe 5 (~55 GB/s): 6.4 ms a copy. A CPU that streams
# it in 3 ms per call plus 1 ms per token row.
EXPERT = 352_000_000
PCIE = LinkSpeed(55e9, 10e-6, "test")
CPU = CpuSpeed(seconds_fixed=3e-3, seconds_per_row=1e-3)


def test_single_decode_tokens_go_to_the_cpu_a_prefill_chunk_is_copied() -> None:
    assert place([Miss(3, 1, EXPERT)], CPU, PCIE, queued_bytes=0) == {3: "cpu"}  # 4 ms against 6.4
    prefill = [Miss(e, 200, EXPERT) for e in (3, 5)]
    assert place(prefill, CPU, PCIE, queued_bytes=0) == {3: "copy", 5: "copy"}


def test_a_fast_link_copies_and_a_slow_one_computes() -> None:
    misses = [Miss(1, 4, EXPERT)]
    assert place(misses, CPU, LinkSpeed(500e9, 0.0, "test"), 0) == {1: "copy"}  # 0.7 ms < 7 ms
    assert place(misses, CPU, LinkSpeed(0.5e9, 0.0, "test"), 0) == {1: "cpu"}


def test_bytes_queued_on_the_link_push_a_miss_to_the_cpu() -> None:
    misses = [Miss(1, 8, EXPERT)]  # CPU: 11 ms; copy: 6.4 ms, or 38 ms behind five queued experts
    assert place(misses, CPU, PCIE, queued_bytes=0) == {1: "copy"}
    assert place(misses, CPU, PCIE, queued_bytes=5 * EXPERT) == {1: "cpu"}


def test_the_split_balances_the_cpu_against_the_link_lightest_first() -> None:
    # Four one-row misses: all copied take 25.6 ms, all on the CPU 16 ms, two each way 12.8 ms,
    # three on the CPU while one is copied 12 ms.
    misses = [Miss(e, 1, EXPERT) for e in range(4)]
    ways = place(misses, CPU, PCIE, 0)
    assert sorted(ways.values()) == ["copy", "cpu", "cpu", "cpu"]
    # the heaviest expert is the one copied
    ways = place([Miss(0, 1, EXPERT), Miss(1, 30, EXPERT)], CPU, PCIE, 0)
    assert ways == {0: "cpu", 1: "copy"}


def test_a_low_precision_miss_weighs_its_smaller_copy() -> None:
    # int4 copy of the expert: a quarter of the bytes, 1.6 ms, below the CPU's 4 ms
    assert place([Miss(2, 1, EXPERT // 4, low=True)], CPU, PCIE, 0) == {2: "low"}
    assert place([Miss(2, 1, EXPERT, low=True)], CPU, PCIE, 0) == {2: "cpu"}
    assert place([], CPU, PCIE, 0) == {}


def test_ties_go_to_the_copy() -> None:
    link = LinkSpeed(1e9, 0.0, "test")
    assert place([Miss(0, 0, 1_000_000)], CpuSpeed(1e-3, 0.0), link, 0) == {0: "copy"}


def test_cpu_layers_resolve_against_the_moe_layers() -> None:
    moe = (1, 2, 3, 5)
    assert resolve_cpu_layers(0, moe) == frozenset()
    assert resolve_cpu_layers(2, moe) == {1, 2}
    assert resolve_cpu_layers((2, 5), moe) == {2, 5}
    with pytest.raises(ValueError, match="4 MoE layers"):
        resolve_cpu_layers(5, moe)
    with pytest.raises(ValueError, match="layer.s. 0, 4 are not MoE layers"):
        resolve_cpu_layers((0, 4, 5), moe)


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("0-2,7", (0, 1, 2, 7)), ("5", (5,)), (" 1 , 3-4", (1, 3, 4))])
def test_cpu_layers_accepts_a_count_or_indices(value: object, expected: object) -> None:
    assert EngineConfig.from_user(cpu_layers=value).cpu_layers == expected


@pytest.mark.parametrize("value", [-1, True, "", "a", "3-1", "1-", "1.5", 2.0])
def test_bad_cpu_layers_are_refused_naming_the_option(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^cpu_layers="):
        EngineConfig.from_user(cpu_layers=value)


def test_miss_compute_is_checked_and_refused_on_the_cpu_device() -> None:
    assert EngineConfig.from_user().miss_compute == "copy"
    assert EngineConfig.from_user(miss_compute="auto", device="sim").miss_compute == "auto"
    with pytest.raises(ConfigError, match=r"^miss_compute='gpu': expected one of copy, cpu, auto"):
        EngineConfig.from_user(miss_compute="gpu")
    with pytest.raises(ConfigError, match=r"^miss_compute='cpu' with device='cpu': experts already run on the CPU"):
        EngineConfig.from_user(miss_compute="cpu", device="cpu")
    with pytest.raises(ConfigError, match=r"^cpu_layers=2 with device='cpu'"):
        EngineConfig.from_user(cpu_layers=2, device="cpu")
    assert EngineConfig.from_user(device="cpu", miss_compute="copy", cpu_layers=0).cpu_layers == 0

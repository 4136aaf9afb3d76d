"""expert_budget='auto' sizes the fast tier from free memory, and the plan is reported (plan_report, plan_line)."""

from __future__ import annotations

import json

import pytest

from moeflow import Engine
from moeflow.config import MIN_RESERVE, EngineConfig, default_reserve, parse_budget
from moeflow.errors import ConfigError
from moeflow.memory import planner
from moeflow.memory.planner import free_memory, plan_tiers
from moeflow.session import dense_weight_bytes

BLOCK = 1 << 20  # one expert: 1 MiB
EXPERTS = 64
TOP_K = 2


def _probe(free: int):  # type: ignore[no-untyped-def]
    return lambda device: (free, "test probe")


def test_auto_takes_free_memory_minus_reserve_and_dense_weights() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve="8MiB")
    tiers = plan_tiers(config, "cpu", BLOCK, None, EXPERTS, TOP_K, dense_bytes=4 << 20, probe=_probe(40 << 20))
    assert tiers.fast.budget_bytes == (40 - 8 - 4) << 20
    assert tiers.fast.slots == 28
    assert tiers.fit is not None and tiers.fit.as_dict() == {
        "free_bytes": 40 << 20, "reserve_bytes": 8 << 20, "dense_bytes": 4 << 20, "free_source": "test probe"}
    # the KV cache gets its share of the reserve when kv_budget is unset
    assert tiers.kv_budget == 6 << 20


def test_auto_is_capped_at_all_experts() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0)
    tiers = plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, probe=_probe(1 << 40))
    assert tiers.fast.slots == EXPERTS and tiers.fast.budget_bytes == EXPERTS * BLOCK


def test_auto_default_reserve_is_ten_percent_at_least_one_gib() -> None:
    assert default_reserve(2 << 30) == MIN_RESERVE
    assert default_reserve(100 << 30) == 10 << 30
    config = EngineConfig.from_user(expert_budget="auto")
    tiers = plan_tiers(config, "cpu", BLOCK, None, EXPERTS, TOP_K, probe=_probe(MIN_RESERVE + (10 << 20)))
    assert tiers.fit is not None and tiers.fit.reserve_bytes == MIN_RESERVE
    assert tiers.fast.slots == 10


def test_auto_reserve_covers_a_kv_budget_the_user_set() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve="1MiB", kv_budget="30MiB")
    tiers = plan_tiers(config, "cpu", BLOCK, None, EXPERTS, TOP_K, probe=_probe(100 << 20))
    assert tiers.fit is not None and tiers.fit.reserve_bytes == 40 << 20  # 30 MiB is the KV's 3/4
    assert tiers.kv_budget is None  # the user's kv_budget stands
    assert tiers.fast.slots == 60


def test_auto_below_the_minimum_names_free_reserve_and_minimum() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve="8MiB")
    with pytest.raises(ConfigError) as err:
        plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, dense_bytes=1 << 20, probe=_probe(10 << 20))
    text = str(err.value)
    assert "expert_budget='auto'" in text and str(10 << 20) in text and str(8 << 20) in text
    assert f"minimum of {2 * BLOCK} bytes" in text and "memory_reserve" in text


def test_auto_splits_with_miss_precision() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0, miss_precision="int8",
                                    low_precision_share=0.25)
    tiers = plan_tiers(config, "sim", BLOCK, BLOCK // 2, EXPERTS, TOP_K, probe=_probe(32 << 20))
    assert tiers.low is not None
    assert tiers.fast.budget_bytes == 24 << 20 and tiers.low.budget_bytes == 8 << 20


def test_auto_parsing_and_options() -> None:
    assert parse_budget("auto").auto and str(parse_budget(" AUTO ")) == "auto"
    with pytest.raises(ConfigError, match="host_budget='auto'"):
        EngineConfig.from_user(host_budget="auto")
    with pytest.raises(ConfigError, match="memory_reserve=.*only to expert_budget='auto'"):
        EngineConfig.from_user(expert_budget="50%", memory_reserve="1GiB")
    with pytest.raises(ConfigError, match="memory_reserve"):
        EngineConfig.from_user(expert_budget="auto", memory_reserve="lots")


def test_free_memory_probe_is_positive_on_this_machine() -> None:
    free, source = free_memory("cpu")
    assert free > 0 and source
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0)
    tiers = plan_tiers(config, "cpu", BLOCK, None, EXPERTS, TOP_K)
    assert 0 < tiers.fast.slots <= EXPERTS


@pytest.mark.asyncio
async def test_engine_reports_an_auto_plan(hf_checkpoints, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = hf_checkpoints.path("mixtral")
    async with Engine.open(path, expert_budget="50%", device="cpu") as eng:
        fixed = eng.session.plan_report()
        block, total = fixed["block_bytes"], fixed["experts_total"]
        session = eng.session
        dense = dense_weight_bytes(session.checkpoint, total * session.arch.hidden_size
                                   * session.arch.expert_intermediate * 3, session.dtype)
    assert fixed["expert_budget"] == "50%" and fixed["slots"] == {"fast": total // 2}
    assert fixed["kv_capacity_tokens"] is None and "reserve_bytes" not in fixed
    # free memory for a third of the experts above the reserve and the dense weights
    reserve = 1 << 20
    monkeypatch.setattr(planner, "free_memory", lambda device: (reserve + dense + (total // 3) * block + 1, "fixed"))
    async with Engine.open(path, expert_budget="auto", memory_reserve=reserve, device="cpu") as eng:
        report = eng.session.plan_report()
        line = eng.session.plan_line()
        # the KV bound the plan states is the one requests are admitted against
        assert eng.session.kv_budget == reserve * 3 // 4
        tokens = (await eng.generate([5, 17, 42, 3], 4, stop_at_eos=False)).tokens
    json.dumps(report)
    assert len(tokens) == 4
    assert report["expert_budget"] == "auto" and report["reserve_bytes"] == reserve
    assert report["dense_bytes"] == dense > 0
    assert report["slots"]["fast"] == total // 3
    assert report["kv_capacity_tokens"] == (reserve * 3 // 4) // report["kv_bytes_per_token"]
    assert report["predictor"] and report["policy"] == "lru" and report["device"] == "cpu"
    assert line.startswith("plan: budget auto") and f"KV capacity {report['kv_capacity_tokens']} tokens" in line
    assert f"{report['slots']['fast']} fast" in line and "policy lru" in line


def _probes(device_free: int, host_free: int):  # type: ignore[no-untyped-def]
    return lambda device: (host_free if device == "cpu" else device_free, device)


def test_auto_on_a_gpu_keeps_every_expert_in_host_memory_when_it_fits() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0)
    tiers = plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, probe=_probes(16 << 20, MIN_RESERVE + (64 << 20)))
    assert tiers.fast.slots == 16 and tiers.host is None
    assert tiers.fit is not None and tiers.fit.as_dict()["host_free_bytes"] == MIN_RESERVE + (64 << 20)


def test_auto_on_a_gpu_makes_a_host_cache_of_what_the_host_has_free() -> None:
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0)
    tiers = plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, probe=_probes(16 << 20, MIN_RESERVE + (40 << 20)))
    assert tiers.host is not None and tiers.host.slots == 40  # three tiers: device <- host cache <- disk
    with pytest.raises(ConfigError, match="host has .* free.*set host_budget"):
        plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, probe=_probes(16 << 20, MIN_RESERVE + BLOCK))
    # a host_budget the user set stands
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0, host_budget="50%")
    tiers = plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K, probe=_probes(16 << 20, 0))
    assert tiers.host is not None and tiers.host.slots == EXPERTS // 2


@pytest.mark.gpu
def test_free_memory_probe_on_a_gpu_is_positive_and_below_its_total() -> None:
    import torch

    free, source = free_memory("cuda")
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory and source == "torch.cuda.mem_get_info"
    config = EngineConfig.from_user(expert_budget="auto", memory_reserve=0)
    tiers = plan_tiers(config, "cuda", BLOCK, None, EXPERTS, TOP_K)
    assert 0 < tiers.fast.slots <= EXPERTS

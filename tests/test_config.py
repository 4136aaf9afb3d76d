"""EngineConfig and MemoryPlan: validated once, errors name the option and value."""

from __future__ import annotations

import pytest
import torch

from moeflow.config import Budget, EngineConfig, MemoryPlan, parse_budget, parse_size
from moeflow.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), (4096, 4096), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("64k", 65536)],
)
def test_sizes_parse(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-1", True, 1.5, None])
def test_bad_sizes_name_the_value(bad: object) -> None:
    with pytest.raises(ConfigError, match="expert_budget"):
        parse_size(bad, "expert_budget")


def test_percent_budgets_resolve_against_the_model() -> None:
    assert parse_budget("25%").resolve(1000) == 250
    assert parse_budget(0.5).resolve(1000) == 500
    with pytest.raises(ConfigError):
        parse_budget("0%")
    with pytest.raises(ConfigError):
        parse_budget("150%")


def test_unknown_options_are_type_errors_and_bad_values_config_errors() -> None:
    with pytest.raises(TypeError, match="prefech"):
        EngineConfig.from_user(prefech="none")
    for kw in ({"device": "tpu"}, {"policy": "random"}, {"dtype": "int3"}, {"io_workers": 0}, {"direct_io": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            EngineConfig.from_user(**kw)
    cfg = EngineConfig.from_user(expert_budget="1GiB", dtype="bfloat16", device="cpu")
    assert cfg.expert_budget == Budget(bytes=1 << 30) and cfg.dtype is torch.bfloat16


def test_memory_plan_refuses_below_top_k_and_clamps_above_total() -> None:
    with pytest.raises(ConfigError, match="minimum of 8192 bytes"):
        MemoryPlan.build(Budget(bytes=8191), 4096, 16, 2)
    plan = MemoryPlan.build(Budget(bytes=10**9), 4096, 16, 2)
    assert plan.slots == 16
    plan = MemoryPlan.build(Budget(fraction=0.25), 4096, 16, 2)
    assert plan.slots == 4 and plan.arena_bytes == 4 * 4096

"""EngineConfig and MemoryPlan: validated once, errors name the option and value; checkpoint
configs that contradict themselves or their weights are refused naming the field."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.config import Budget, EngineConfig, MemoryPlan, parse_budget, parse_size
from moeflow.errors import CheckpointError, ConfigError
from tests.conftest import HFCheckpoints


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


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"io_workers": 1000}, r"io_workers=1000: expected at most 256"),
        ({"io_workers": 257}, r"io_workers=257"),
        ({"threads": 10**6}, r"threads=1000000: expected at most \d+ \(this machine has \d+ CPUs\)"),
        ({"prefill_chunk": 0}, r"prefill_chunk=0"),
        ({"prefill_chunk": True}, r"prefill_chunk=True"),
        ({"prefill_chunk": "512"}, r"prefill_chunk='512'"),
        ({"precision": "int4", "group_size": 3}, r"precision='int4' with group_size=3"),
        ({"miss_precision": "int9"}, r"miss_precision='int9'"),
        ({"io_chunk": 2**70}, r"io_chunk=1180591620717411303424: .* at most 1 TiB"),
        ({"store_dir": 123}, r"store_dir=123: expected a folder path"),
        ({"predictor_dir": 1.5}, r"predictor_dir=1.5: expected a folder path"),
    ],
)
def test_every_option_error_is_a_config_error_naming_the_option(options: dict[str, object], named: str) -> None:
    """Raised by from_user, i.e. by Engine.open before the checkpoint is read or anything
    allocated (io_workers=1000 used to pass here and fail later as a bare ValueError from the
    transfer engine, io_chunk=2**70 as an OverflowError, a store_dir of 123 as a TypeError;
    threads=10**6 used to crash torch)."""
    with pytest.raises(ConfigError, match=named):
        EngineConfig.from_user(**options)


def test_limits_themselves_are_accepted() -> None:
    cfg = EngineConfig.from_user(io_workers=256, threads=1, prefill_chunk=1)
    assert (cfg.io_workers, cfg.threads, cfg.prefill_chunk) == (256, 1, 1)
    assert EngineConfig.from_user().prefill_chunk == 512


# ---- checkpoint configs that disagree with themselves or with their weights ------------------

def _copy(hf_checkpoints: HFCheckpoints, family: str, dst: Path) -> Path:
    shutil.copytree(hf_checkpoints.path(family), dst, ignore=shutil.ignore_patterns(".moeflow"))
    return dst


def _edit(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _set_rope_parameters_theta(value: float) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["rope_parameters"]["rope_theta"] = value

    return edit


def _old_layout_theta(value: float) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field", "value"),
    [
        (_set_rope_parameters_theta(-1.0), "rope_parameters.rope_theta", "-1.0"),
        (_set_rope_parameters_theta(0.0), "rope_parameters.rope_theta", "0.0"),
        (_old_layout_theta(-1.0), "rope_theta", "-1.0"),
        (_old_layout_theta(0), "rope_theta", "0.0"),
    ],
    ids=["rope_parameters-negative", "rope_parameters-zero", "rope_theta-negative", "rope_theta-zero"],
)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.asyncio
async def test_rope_theta_not_above_zero_is_a_checkpoint_error(
    hf_checkpoints: HFCheckpoints, tmp_path: Path, family: str, edit: Callable[[dict[str, Any]], None],
    field: str, value: str,
) -> None:
    path = _copy(hf_checkpoints, family, tmp_path / "model")
    _edit(path, edit)
    with pytest.raises(CheckpointError, match=f"'{field}' is {value}.* finite number > 0") as info:
        await asyncio.wait_for(Engine.open(path, device="cpu").start(), 60)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("family", "layers", "held"),
    [("mixtral", 1, 2), ("mixtral", 3, 2), ("qwen2_moe", 2, 3), ("deepseek_v2", 4, 3), ("olmoe", 1, 2)],
)
@pytest.mark.asyncio
async def test_layer_count_that_disagrees_with_the_weights_is_a_checkpoint_error(
    hf_checkpoints: HFCheckpoints, tmp_path: Path, family: str, layers: int, held: int
) -> None:
    """Fewer layers in the config than in the weights used to run a cut-down model silently;
    more used to fail mid-load on a missing tensor without naming the field."""
    path = _copy(hf_checkpoints, family, tmp_path / "model")
    _edit(path, lambda cfg: cfg.update(num_hidden_layers=layers))
    with pytest.raises(CheckpointError, match=f"'num_hidden_layers' is {layers} but the weights hold {held} ") as info:
        await asyncio.wait_for(Engine.open(path, device="cpu").start(), 60)
    assert info.value.field == "num_hidden_layers"
    assert not (path / ".moeflow").exists()  # refused before any store was built


@pytest.mark.asyncio
async def test_deepseek_v3_draft_layers_beyond_the_config_are_allowed(hf_checkpoints: HFCheckpoints,
                                                                      tmp_path: Path) -> None:
    """DeepSeek-V3 checkpoints ship num_nextn_predict_layers multi-token-prediction layers after
    the decoder layers (model.layers.61 of a 61-layer model); they are not run, and not an error."""
    from safetensors.torch import load_file, save_file

    path = _copy(hf_checkpoints, "deepseek_v3", tmp_path / "model")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.3.enorm.weight"] = torch.ones(32)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    _edit(path, lambda cfg: cfg.update(num_nextn_predict_layers=1))
    async with Engine.open(path, device="cpu") as eng:
        assert len((await eng.generate([5, 17, 42], 2)).tokens) >= 1
    _edit(path, lambda cfg: cfg.update(num_nextn_predict_layers=0))
    with pytest.raises(CheckpointError, match="'num_hidden_layers' is 3 but the weights hold 4 "):
        await Engine.open(path, device="cpu")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("rms_norm_eps", -1.0, "must be >= 0"),
        ("rms_norm_eps", float("nan"), "bad value nan"),
        ("max_position_embeddings", 0, "must be > 0"),
        ("routed_scaling_factor", float("inf"), "bad value inf"),
    ],
)
@pytest.mark.asyncio
async def test_config_numbers_that_would_give_nan_or_refuse_everything_are_checkpoint_errors(
    hf_checkpoints: HFCheckpoints, tmp_path: Path, field: str, value: float, says: str
) -> None:
    path = _copy(hf_checkpoints, "deepseek_v3", tmp_path / "model")
    _edit(path, lambda cfg: cfg.update({field: value}))  # json writes NaN / Infinity, as some tools do
    with pytest.raises(CheckpointError, match=f"'{field}'.*{says}") as info:
        await asyncio.wait_for(Engine.open(path, device="cpu").start(), 60)
    assert info.value.field == field


@pytest.mark.parametrize("options, name", [
    ({"kv_budget": "lots"}, "kv_budget"), ({"kv_budget": 0}, "kv_budget"), ({"kv_budget": True}, "kv_budget"),
    ({"max_batch_sequences": 0}, "max_batch_sequences"), ({"max_batch_sequences": 2.5}, "max_batch_sequences"),
])
def test_batching_options_are_checked_naming_the_option(options: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EngineConfig.from_user(**options)
    assert EngineConfig.from_user(kv_budget="2GiB", max_batch_sequences=8).kv_budget == 2 << 30

"""The supported families, by config.json model_type, and parse_arch: a checkpoint's normalized architecture."""

from __future__ import annotations

from types import ModuleType

from moeflow.errors import UnsupportedModel
from moeflow.models import deepseek, glm, gpt_oss, llama4, minimax, mixtral, olmoe, phimoe, qwen3_next, qwen_moe
from moeflow.models.base import Arch, ConfigReader
from moeflow.models.checkpoint import Checkpoint

_FAMILIES: tuple[ModuleType, ...] = (mixtral, qwen_moe, olmoe, deepseek, llama4, phimoe, glm, minimax, gpt_oss,
                                     qwen3_next)
FAMILIES: dict[str, ModuleType] = {t: m for m in _FAMILIES for t in m.MODEL_TYPES}

__all__ = ["FAMILIES", "parse_arch"]


def parse_arch(checkpoint: Checkpoint) -> Arch:
    """The normalized architecture of a checkpoint; UnsupportedModel names what is not supported."""
    cfg = ConfigReader(checkpoint.config, checkpoint.path)
    model_type = cfg.req("model_type", str)
    family = FAMILIES.get(model_type)
    if family is None:
        archs = checkpoint.config.get("architectures") or [model_type]
        raise UnsupportedModel(
            f"{checkpoint.path / 'config.json'}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
            f"supported model types: {', '.join(sorted(FAMILIES))}",
            path=str(checkpoint.path / "config.json"),
            field="model_type",
        )
    arch: Arch = family.parse(cfg)
    adapt = getattr(family, "adapt", None)  # a layout the config does not name (Qwen3.5-MoE's fused experts)
    if adapt is not None:
        arch = adapt(arch, checkpoint)
    cfg.check_layers(arch, checkpoint.tensors)
    return arch

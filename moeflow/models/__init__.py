"""Architecture families: how a Hugging Face checkpoint maps onto attention, router and experts."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeflow.models.base import Arch, ConfigReader
    from moeflow.models.checkpoint import Checkpoint
    from moeflow.models.families import FAMILIES, parse_arch

__all__ = ["FAMILIES", "Arch", "Checkpoint", "ConfigReader", "parse_arch"]

# Imported on first use (PEP 562): these pull in torch, and a light import of a submodule
# (moeflow.models.hub, to resolve a repo id before anything loads) must not wait for it.
_LAZY = {
    "Arch": "moeflow.models.base", "ConfigReader": "moeflow.models.base",
    "Checkpoint": "moeflow.models.checkpoint",
    "FAMILIES": "moeflow.models.families", "parse_arch": "moeflow.models.families",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moeflow.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

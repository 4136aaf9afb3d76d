"""Checks of command-line arguments that run before any model loads: ranges, files, engine options, the model."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moeflow.config import EngineConfig
from moeflow.errors import CheckpointError, ConfigError, MoeflowError

# Engine options of every model command: each flag's dest is the EngineConfig field of that name.
ENGINE_OPTIONS = ("expert_budget", "memory_reserve", "kv_budget", "device", "prefetch", "policy", "dtype", "direct_io",
                  "store_dir", "threads", "precision", "miss_precision", "sim_bandwidth_gbps", "sim_latency_us",
                  "miss_compute", "cpu_layers")


class MissingExtra(MoeflowError, ImportError):
    """A command needs an optional dependency that is not installed (the message names the extra)."""


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def at_least(args: argparse.Namespace, dest: str, low: float) -> None:
    """ConfigError naming the flag when `args.dest` is given and below `low`."""
    value = getattr(args, dest, None)
    if value is not None and value < low:
        raise ConfigError(f"{flag(dest)} {value}: must be >= {low:g}")


def within(args: argparse.Namespace, dest: str, low: float, high: float) -> None:
    """ConfigError naming the flag when `args.dest` is given and outside [low, high]."""
    value = getattr(args, dest, None)
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{flag(dest)} {value}: must be in [{low:g}, {high:g}]")


def readable_file(option: str, path: str | os.PathLike[str]) -> Path:
    """The path of an input file; FileNotFoundError / IsADirectoryError naming the option otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, f"{option}: no such file", str(p))
    if p.is_dir():
        raise IsADirectoryError(21, f"{option}: is a folder, not a file", str(p))
    return p


def writable_file(option: str, path: str | os.PathLike[str]) -> Path:
    """The path of a file to write, checked now so a long run does not fail at its end."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(21, f"{option}: is a folder, not a file", str(p))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(2, f"{option}: its folder does not exist", str(parent))
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise PermissionError(13, f"{option}: cannot write there", str(p if p.exists() else parent))
    return p


def writable_dir(option: str, path: str | os.PathLike[str]) -> Path:
    """A folder to write into (it may not exist yet: then the nearest existing parent must be writable)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(20, f"{option}: is a file, not a folder", str(p))
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(20, f"{option}: a file is in the way", str(probe))
    if not os.access(probe, os.W_OK):
        raise PermissionError(13, f"{option}: cannot write there", str(probe))
    return p


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line, validated by EngineConfig.from_user now (a
    ConfigError naming the option before the model loads); an option left out is not passed."""
    given = {name: getattr(args, name, None) for name in ENGINE_OPTIONS}
    options = {**{k: v for k, v in given.items() if v is not None}, "progress": not getattr(args, "json", False)}
    try:
        EngineConfig.from_user(**options)
    except ConfigError as e:
        raise ConfigError(flagged(str(e), options)) from e
    return options


def flagged(message: str, names: Iterable[str]) -> str:
    """An API error message as the command line says it: `expert_budget='x': ...` -> `--expert-budget 'x': ...`."""
    for name in names:
        if message.startswith(f"{name}="):
            return f"{flag(name)} {message[len(name) + 1:]}"
    return message


def engine_defaults() -> dict[str, str]:
    """EngineConfig's defaults as help text shows them (no torch import)."""
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name in ENGINE_OPTIONS and f.default is not dataclasses.MISSING:
            out[f.name] = str(f.default)
    return out


def checkpoint_dir(name: str) -> Path:
    """The local folder of MODEL: a checkpoint directory, or a Hugging Face repo id found in the
    local Hugging Face cache (nothing is downloaded). CheckpointError saying where it looked otherwise."""
    from moeflow.models.hub import resolve_model

    path = resolve_model(name)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{name}: no config.json in {path}; give a checkpoint directory "
                              "(config.json + *.safetensors)", path=str(path))
    return path


def plot_available() -> str | None:
    """None when matplotlib can be imported, else a note saying how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: pip install 'moeflow[plot]'"
    return None

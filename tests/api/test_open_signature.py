"""Engine.open lists every EngineConfig option as a typed keyword, with the config's defaults and
choices and a docstring line each, so editors can complete it; misspelt names stay TypeErrors."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from moeflow import config
from moeflow.api import Engine
from moeflow.config import EngineConfig

CHOICES = {"device": config.DEVICES, "prefetch": config.PREFETCHERS, "policy": config.POLICIES,
           "budget_split": config.BUDGET_SPLITS, "direct_io": config.DIRECT_IO, "store_mode": config.STORE_MODES,
           "batch_order": config.BATCH_ORDERS}


def _options() -> dict[str, inspect.Parameter]:
    params = inspect.signature(Engine.open).parameters
    return {name: p for name, p in params.items() if name not in ("cls", "path")}


def test_open_takes_every_config_option_as_a_keyword_only_parameter() -> None:
    options = _options()
    assert list(options) == [f.name for f in dataclasses.fields(EngineConfig)]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options.values())
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(Engine.open).parameters.values())


def test_opens_defaults_are_the_configs() -> None:
    defaults = {name: p.default for name, p in _options().items()}
    assert EngineConfig.from_user(**defaults) == EngineConfig()


def test_choice_options_complete_to_the_configs_choices() -> None:
    hints = typing.get_type_hints(Engine.open)
    for name, allowed in CHOICES.items():
        assert set(typing.get_args(hints[name])) == set(allowed), name


def test_the_docstring_has_a_line_per_option() -> None:
    doc = inspect.getdoc(Engine.open) or ""
    lines = [line.split(":")[0].strip() for line in doc.splitlines() if ":" in line and not line.startswith(" ")]
    assert [name for name in lines if name in _options()] == list(_options())


def test_a_misspelt_option_is_a_type_error_naming_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="expert_bugdet"):
        Engine.open(tmp_path, expert_bugdet="1GiB")  # type: ignore[call-arg]

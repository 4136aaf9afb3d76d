"""Every option's help says its default (or when it is required), as `moeflow <command> --help` shows it."""

from __future__ import annotations

import argparse

from moeflow.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_that_takes_a_value_shows_its_default() -> None:
    missing = []
    for name, parser in _commands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # positionals, switches (--json) and required options have no default
            text = formatter._expand_help(action)  # what --help prints for it
            if "default" not in text and "required unless" not in text:
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []


def test_serve_fits_the_budget_to_the_machine_by_default_and_run_takes_all_experts() -> None:
    commands = _commands()
    serve = commands["serve"].parse_args(["model"])
    assert serve.expert_budget == "auto"
    assert "(default: auto)" in " ".join(commands["serve"].format_help().split())
    assert commands["run"].parse_args(["model"]).expert_budget is None  # EngineConfig's own default
    assert "(default: 100%)" in " ".join(commands["run"].format_help().split())

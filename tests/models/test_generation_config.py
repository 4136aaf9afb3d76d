"""generation_config.json: EOS ids, and sampling defaults resolved as transformers' generate does
(greedy without do_sample, repetition_penalty either way, the caller's values first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.errors import CheckpointError
from moeflow.models.generation import GenerationConfig, load_generation_config
from moeflow.runtime.sampling import SamplingParams

UNSET = dict(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None)


def _load(tmp_path: Path, content: object) -> GenerationConfig:
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    return load_generation_config(tmp_path)


def test_no_file_means_greedy_and_no_eos_of_its_own(tmp_path: Path) -> None:
    gen = load_generation_config(tmp_path)
    assert gen == GenerationConfig()
    assert SamplingParams(**gen.sampling(**UNSET)) == SamplingParams()


def test_without_do_sample_decoding_is_greedy_but_the_repetition_penalty_applies(tmp_path: Path) -> None:
    gen = _load(tmp_path, {"eos_token_id": 7, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})
    assert gen.eos_token_ids == (7,)
    params = SamplingParams(**gen.sampling(**UNSET))
    assert params.temperature == 0 and params.top_p is None and params.repetition_penalty == 1.1


def test_with_do_sample_the_files_values_are_the_defaults_and_the_callers_win(tmp_path: Path) -> None:
    gen = _load(tmp_path, {"eos_token_id": [5, 6, 5], "do_sample": True, "temperature": 0.6, "top_k": 0,
                           "top_p": 0.95, "min_p": 0.05})
    assert gen.eos_token_ids == (5, 6)
    params = SamplingParams(**gen.sampling(**UNSET))
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, None, 0.95, 0.05)  # top_k 0: none
    mine = SamplingParams(**gen.sampling(**{**UNSET, "temperature": 0.0, "top_p": 0.5}))
    assert (mine.temperature, mine.top_p, mine.min_p) == (0.0, 0.5, 0.05)
    assert SamplingParams(**_load(tmp_path, {"do_sample": True}).sampling(**UNSET)).temperature == 1.0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_an_unreadable_file_is_refused_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match="generation_config.json"):
        load_generation_config(tmp_path)

"""The one tensor-name table against checkpoints transformers itself saves, for every family."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.models import Checkpoint, parse_arch
from moeflow.models.tensors import checkpoint_tensors
from tests.hf_models import FAMILIES, save_tiny


def _table_matches_checkpoint(path: Path) -> None:
    ckpt = Checkpoint(path)
    table = checkpoint_tensors(parse_arch(ckpt))
    names = [t.name for t in table]
    assert len(names) == len(set(names)), "a name is listed twice"
    assert {t.name: t.shape for t in table} == {name: info.shape for name, info in ckpt.tensors.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_table_lists_exactly_what_transformers_saves(family: str, hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    _table_matches_checkpoint(hf_checkpoints.path(family))


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("deepseek_v3", {"attention_bias": True}),  # MLA biases, with a q LoRA
        ("deepseek_v2", {"attention_bias": True}),  # MLA biases, without
        ("mixtral", {"tie_word_embeddings": True}),  # no lm_head tensor
    ],
)
def test_table_follows_optional_tensors(family: str, overrides: dict[str, object], tmp_path: Path) -> None:
    _table_matches_checkpoint(save_tiny(family, tmp_path / family, **overrides))

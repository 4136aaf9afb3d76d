"""The router table predictors are built from, and the gate lookahead applying its weights."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.scheduling import make_predictor, router_table
from moeflow.scheduling.predictors import EAMPredictor, GateLookaheadPredictor

# H = hidden, E = experts.
H, E, K = 16, 8, 2


def _weights(layers: tuple[int, ...], seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(E, H, generator=gen) for layer in layers}


def test_table_reads_layers_and_experts_from_the_weights() -> None:
    table = router_table(_weights((3, 1, 2)), top_k=K, scoring="softmax", dtype=torch.float32)
    assert table.moe_layers == (1, 2, 3)
    assert table.num_experts == E


@pytest.mark.parametrize(
    ("weights", "options", "message"),
    [
        ({}, {}, "at least one"),
        ({0: torch.zeros(E, H), 1: torch.zeros(E + 1, H)}, {}, r"disagree on the number of experts: \[8, 9\]"),
        ({0: torch.zeros(E, H)}, {"scoring": "relu"}, "scoring 'relu'"),
        ({0: torch.zeros(E, H)}, {"top_k": E + 1}, "top_k 9"),
        ({0: torch.zeros(E)}, {}, r"shape \[8\], expected \[8, hidden\]"),
    ],
)
def test_inconsistent_tables_are_refused_naming_the_value(weights: dict[int, torch.Tensor], options: dict[str, object],
                                                          message: str) -> None:
    kw: dict[str, object] = {"top_k": K, "scoring": "softmax", "dtype": torch.float32, **options}
    with pytest.raises(ConfigError, match=message):
        router_table(weights, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gate_lookahead_ranks_the_next_layers_by_their_own_router(scoring: str) -> None:
    weights = _weights((1, 2, 4), seed=1)
    predictor = GateLookaheadPredictor(router_table(weights, top_k=K, scoring=scoring, dtype=torch.float64), depth=2)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tracker = predictor.track([0])
    guess = tracker.guess(1, x)
    assert guess is not None
    got = tracker.after_route(1, [[0] * K], guess.tolist())
    assert sorted(got) == [2, 4]  # the next two MoE layers; dense layer 3 is skipped
    for layer in (2, 4):
        logits = x @ weights[layer].double().T
        scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        want = torch.topk(scores[0], K + 1)
        assert [e for e, _ in got[layer]] == want.indices.tolist()
        assert [s for _, s in got[layer]] == pytest.approx(want.values.tolist())
    assert tracker.guess(4, x) is None  # the last MoE layer: nothing to guess
    assert tracker.after_route(4, [[0] * K], None) == {}


def test_make_predictor_builds_from_the_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = router_table(_weights((0, 1)), top_k=K, scoring="softmax", dtype=torch.float32)
    eam = make_predictor("eam", table, 4, tmp_path, "signature")
    assert isinstance(eam, EAMPredictor)
    assert (eam.moe_layers, eam.num_experts, eam.k, eam.depth) == ((0, 1), E, K, 2)
    assert isinstance(make_predictor("auto", table, 1, tmp_path, "signature"), GateLookaheadPredictor)

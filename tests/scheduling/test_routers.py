"""The router table predictors are built from, and the gate lookahead applying its weights."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.scheduling import make_predictor, router_table
from moeflow.scheduling.predictors import EAMPredictor, EntryTable, GateLookaheadPredictor
from moeflow.scheduling.routers import EntryInputs
from moeflow.scheduling.scheduler import speculation

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


# ---- the first MoE layer guessed from the step's tokens (EntryTable) ---------------------------
V = 40


def _entry(seed: int = 3, bias: bool = False) -> EntryInputs:
    gen = torch.Generator().manual_seed(seed)
    return EntryInputs(torch.randn(V, H, generator=gen), torch.rand(H, generator=gen) + 0.5,
                       torch.randn(H, generator=gen) if bias else None, 1e-5)


def _entry_ranking(entry: EntryInputs, router: torch.Tensor, token: int, width: int) -> list[int]:
    """The reference: the token's embedding, normalized as the router's own norm would, ranked by the router."""
    x = entry.embed[token].double()
    if entry.norm_bias is None:
        x = x * torch.rsqrt(x.pow(2).mean() + entry.eps) * entry.norm_weight.double()
    else:
        x = (x - x.mean()) * torch.rsqrt(x.var(unbiased=False) + entry.eps) * entry.norm_weight.double() \
            + entry.norm_bias.double()
    return torch.topk(router.double() @ x, width).indices.tolist()


@pytest.mark.parametrize("bias", [False, True])
def test_the_first_moe_layer_is_guessed_from_the_tokens_own_embedding(bias: bool) -> None:
    weights, entry = _weights((2, 3), seed=4), _entry(bias=bias)
    table = router_table(weights, top_k=K, scoring="softmax", dtype=torch.float32, entry=entry)
    predictor = GateLookaheadPredictor(table, depth=2)
    tracker = predictor.track([0])
    for token in (0, 7, V - 1):
        got = tracker.begin_step([token])
        assert list(got) == [2]  # only the first MoE layer: the gate lookahead covers the rest
        assert [e for e, _ in got[2]] == _entry_ranking(entry, weights[2], token, K + 1)
        assert [s for _, s in got[2]] == sorted((s for _, s in got[2]), reverse=True)


def test_several_tokens_vote_and_ids_outside_the_vocabulary_are_left_to_the_step() -> None:
    weights, entry = _weights((0, 1), seed=5), _entry()
    table = EntryTable(entry, weights[0], K + 1)
    votes = dict(table.votes([1, 2, 2, V + 3, -1]))
    want: dict[int, float] = {}
    for token in (1, 2, 2):
        for e, score in table.votes([token]):
            want[e] = want.get(e, 0.0) + score
    assert votes.keys() == want.keys()
    assert [votes[e] for e in want] == pytest.approx(list(want.values()))
    assert table.votes([V, -2]) == []


def test_the_table_made_at_once_equals_the_one_made_token_by_token() -> None:
    weights, entry = _weights((0, 1), seed=6), _entry()
    lazy = EntryTable(entry, weights[0], K + 1)
    assert not lazy.known.any()  # on the CPU: nothing computed at open
    rows = [lazy.votes([t]) for t in range(V)]
    eager = EntryTable(entry, weights[0], K + 1)
    eager._fill(torch.arange(V))  # what a device-resident embedding does at open
    for t, row in enumerate(rows):
        got = eager.votes([t])
        assert [e for e, _ in got] == [e for e, _ in row]
        assert [s for _, s in got] == pytest.approx([s for _, s in row], rel=1e-5)  # a batched product's last bits differ


def test_entry_inputs_of_the_wrong_shape_are_refused_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"embedding of shape \[40, 16\] and norm weight of shape \[15\]"):
        EntryInputs(torch.zeros(V, H), torch.ones(H - 1), None, 1e-5)
    with pytest.raises(ConfigError, match="entry inputs of hidden size 12 but layer 0's router takes 16"):
        router_table(_weights((0,)), top_k=K, scoring="softmax", dtype=torch.float32,
                     entry=EntryInputs(torch.zeros(V, 12), torch.ones(12), None, 1e-5))


def test_a_wider_prefetch_gets_that_many_guesses_from_the_lookahead() -> None:
    weights = _weights((0, 1), seed=7)
    predictor = GateLookaheadPredictor(router_table(weights, top_k=K, scoring="softmax", dtype=torch.float32,
                                                    entry=_entry()), depth=1, width=5)
    tracker = predictor.track([0])
    guess = tracker.guess(0, torch.randn(1, H))
    assert guess is not None
    assert len(tracker.after_route(0, [[0] * K], guess.tolist())[1]) == 5
    assert len(tracker.begin_step([3])[0]) == 5
    assert GateLookaheadPredictor(router_table(weights, top_k=K, scoring="softmax", dtype=torch.float32),
                                  depth=1, width=1).guesses == K + 1  # never fewer than k+1


@pytest.mark.parametrize(("block", "want"), [(1 << 10, (K + 1, 2 * K + 1)), ((4 << 20) // 5, (K + 1, 2 * K + 1)),
                                             ((4 << 20) // 5 + 1, (K, K)), (22 << 20, (K, K))])
def test_small_experts_get_the_wider_speculation(block: int, want: tuple[int, int]) -> None:
    # (2k+1) blocks within one 4 MiB I/O part: k+1 guesses, 2k+1 in flight; otherwise top-k both
    assert speculation(K, block, 4 << 20) == want

"""Routing: the router's selection against the reference formulas, and grouping a step's routing
by expert (every (token, pick) lands in exactly one group)."""

from __future__ import annotations

import pytest
import torch

from moeflow.models.base import RouterSpec
from moeflow.runtime.moe import Routing
from moeflow.runtime.router import Router


def test_grouping_covers_every_pick_once() -> None:
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 7, 33):
        ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(t)])
        weights = torch.rand(t, 4, generator=gen)
        r = Routing.group(ids, weights, ids.tolist(), weights.tolist())
        assert r.experts == sorted(set(ids.flatten().tolist()))
        seen = set()
        for e in r.experts:
            for tok, slot in zip(r.tokens[e].tolist(), r.slots[e].tolist(), strict=True):
                assert ids[tok, slot] == e
                seen.add((tok, slot))
        assert len(seen) == t * 4


def test_one_token_routing_carries_each_experts_pick_on_the_host() -> None:
    ids = torch.tensor([[5, 2, 9]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    r = Routing.group(ids, weights, ids.tolist(), weights.tolist())
    assert r.experts == [2, 5, 9]
    assert r.host_slots == {2: 1, 5: 0, 9: 2}
    assert [int(r.slots[e]) for e in r.experts] == [1, 0, 2]


def _reference_select(spec: RouterSpec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy routing: softmax in float32, top-k, optional renormalization."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * spec.routed_scaling_factor


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_selection_matches_the_softmax_topk_reference(norm: bool, dtype: torch.dtype) -> None:
    spec = RouterSpec(num_experts=16, top_k=4, norm_topk_prob=norm, keep_fp32_weights=True)
    router = Router(spec, torch.zeros(16, 8), None)
    logits = (torch.randn(33, 16, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    ids, weights = router.select(logits, dtype)
    want_ids, want_weights = _reference_select(spec, logits)
    assert torch.equal(ids, want_ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)

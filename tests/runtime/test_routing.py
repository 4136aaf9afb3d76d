"""Grouping a step's routing by expert: every (token, pick) lands in exactly one group."""

from __future__ import annotations

import torch

from moeflow.runtime.moe import Routing


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


def test_one_token_routing_carries_host_combine_weights() -> None:
    ids = torch.tensor([[5, 2, 9]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    r = Routing.group(ids, weights, ids.tolist(), weights.tolist())
    assert r.experts == [2, 5, 9]
    assert r.scales == {2: weights[0, 1].item(), 5: weights[0, 0].item(), 9: weights[0, 2].item()}
    assert [int(r.slots[e]) for e in r.experts] == [1, 0, 2]

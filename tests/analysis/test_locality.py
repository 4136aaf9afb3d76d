"""MoE-LRC locality metrics on routings whose answers are known."""

from __future__ import annotations

import random

from moeflow.analysis.locality import belady, flattening_point, lfu, lru, sch, srp


def test_srp_is_one_for_constant_routing_and_low_for_random() -> None:
    assert srp([[0, 1]] * 64, 16, 2) == 1.0
    rng = random.Random(0)
    noise = [rng.sample(range(32), 2) for _ in range(512)]
    assert srp(noise, 16, 2) < 0.35
    # windows never cross sequences: two constant sequences on different experts stay at 1
    assert srp([[[0, 1]] * 32, [[2, 3]] * 32], 16, 2) == 1.0


def test_cache_simulations_on_a_known_pattern() -> None:
    route = [[0], [1], [2], [0], [1], [2]]
    assert lru(route, [2]) == [0.0]  # the cyclic pattern defeats LRU
    assert belady(route, [2]) == [2 / 6]  # keeps 0, evicts the farther one
    assert lru(route, [3]) == belady(route, [3]) == [0.5]
    assert lfu([[0], [0], [1], [2], [0]], [2]) == [2 / 5]


def test_orderings_hold_on_random_routing() -> None:
    rng = random.Random(1)
    route = [rng.sample(range(16), 2) for _ in range(400)]
    sizes = [2, 4, 8, 16]
    opt, l_ru, future = belady(route, sizes), lru(route, sizes), sch(route, 16, sizes)
    assert all(o >= x - 1e-9 for o, x in zip(opt, l_ru, strict=True))
    assert all(o >= x - 1e-9 for o, x in zip(opt, future, strict=True))
    assert opt[-1] == l_ru[-1]  # everything fits: only cold misses
    assert flattening_point(sizes, [0.1, 0.5, 0.9, 0.91]) == 8

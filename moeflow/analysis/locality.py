"""Routing locality metrics (MoE-LRC): segment routing predictability (SRP) and segment cache hit rate (SCH),
with LRU, LFU and Belady hit rates for comparison."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

Route = Sequence[Sequence[int]]  # per token, its top-k experts at one layer
Victim = Callable[[int, set[int]], int]  # (position, candidates) -> expert to evict


def srp(route: Route | Sequence[Route], segment: int, k: int) -> float:
    """Segment routing predictability of one layer's routing (one sequence, or several whose
    windows are pooled; windows never cross a sequence boundary).

    For every window of `segment` consecutive tokens, c_e counts tokens whose top-k holds e.
    Predicting {e : c_e >= t} for every token of the window gives matches = sum of c_e over the
    set, preds = S * |set|, acts = S * k. SRP = max over t of 2 * sum(matches) / (sum(preds) + sum(acts)),
    sums taken over all windows before the max (one t for the whole layer).
    """
    routes: Sequence[Route] = [route] if route and isinstance(route[0][0], int) else route  # type: ignore[list-item,assignment]
    if segment <= 0:
        return 0.0
    hist = [0] * (segment + 1)  # hist[c]: (window, expert) pairs with count c
    windows = 0
    for r in routes:
        n = len(r)
        if n < segment:
            continue
        counts: Counter[int] = Counter()
        for i in range(segment):
            counts.update(r[i])
        for start in range(n - segment + 1):
            if start:
                counts.subtract(r[start - 1])
                counts.update(r[start + segment - 1])
            for c in counts.values():
                if c > 0:
                    hist[c] += 1
        windows += n - segment + 1
    if not windows:
        return 0.0
    acts = windows * segment * k
    best, matches, members = 0.0, 0, 0
    for t in range(segment, 0, -1):  # suffix sums: the set for threshold t holds experts with c >= t
        matches += t * hist[t]
        members += hist[t]
        best = max(best, 2 * matches / (segment * members + acts))
    return best


def _simulate(route: Route, size: int, victim: Victim, on_step: Callable[[int], None] | None = None) -> float:
    """Hit rate of a demand cache of `size` experts over `route`; `victim` picks what to evict."""
    cache: set[int] = set()
    hits = total = 0
    for pos, experts in enumerate(route):
        if on_step is not None:
            on_step(pos)
        needed = set(experts)
        for e in experts:
            total += 1
            if e in cache:
                hits += 1
                continue
            if len(cache) >= size:
                candidates = cache - needed  # never evict what this token also needs
                cache.discard(victim(pos, candidates or cache))
            cache.add(e)
    return hits / total if total else 0.0


class _LastUse:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.used: dict[int, int] = {}

    def step(self, pos: int) -> None:
        if pos:
            for e in self.route[pos - 1]:
                self.used[e] = pos - 1

    def age(self, e: int) -> int:
        return self.used.get(e, -1)


def lru(route: Route, sizes: Sequence[int]) -> list[float]:
    out = []
    for m in sizes:
        last = _LastUse(route)
        out.append(_simulate(route, m, lambda pos, c: min(c, key=last.age), last.step))
    return out


def lfu(route: Route, sizes: Sequence[int]) -> list[float]:
    out = []
    for m in sizes:
        last, freq = _LastUse(route), Counter[int]()

        def step(pos: int, last: _LastUse = last, freq: Counter[int] = freq) -> None:
            last.step(pos)
            if pos:
                freq.update(route[pos - 1])

        out.append(_simulate(route, m, _keyed_victim(_count_then_age(freq, last)), step))
    return out


def _count_then_age(counts: Counter[int], last: _LastUse) -> Callable[[int], tuple[int, int]]:
    """Order: fewest counted uses first, then least recently used."""
    return lambda e: (counts[e], last.age(e))


def _keyed_victim(key: Callable[[int], tuple[int, int]]) -> Victim:
    """Evict the candidate with the smallest key."""
    return lambda pos, candidates: min(candidates, key=key)


def belady(route: Route, sizes: Sequence[int]) -> list[float]:
    """Optimal offline eviction: the expert whose next use is farthest away."""
    n = len(route)
    next_use: list[dict[int, int]] = [{} for _ in range(n)]
    upcoming: dict[int, int] = {}
    for p in range(n - 1, -1, -1):
        next_use[p] = dict(upcoming)
        for e in route[p]:
            upcoming[e] = p
    return [_simulate(route, m, lambda pos, c: max(c, key=lambda e: next_use[pos].get(e, n + e))) for m in sizes]


def sch(route: Route, segment: int, sizes: Sequence[int]) -> list[float]:
    """Segment cache hit rate: eviction keeps the experts used most in the next `segment`
    tokens (ties: least recently used). An upper bound for a predictor with that horizon."""
    out = []
    for m in sizes:
        last, future = _LastUse(route), Counter[int]()
        for experts in route[1 : 1 + segment]:
            future.update(experts)

        def step(pos: int, last: _LastUse = last, future: Counter[int] = future) -> None:
            last.step(pos)
            if pos:
                future.subtract(route[pos])
                if pos + segment < len(route):
                    future.update(route[pos + segment])

        out.append(_simulate(route, m, _keyed_victim(_count_then_age(future, last)), step))
    return out


def flattening_point(sizes: Sequence[int], hit_rates: Sequence[float], tolerance: float = 0.02) -> int:
    """The smallest size whose hit rate is within `tolerance` of the largest size's."""
    best = max(hit_rates) if hit_rates else 0.0
    for m, h in zip(sizes, hit_rates, strict=True):
        if h >= best - tolerance:
            return m
    return sizes[-1]

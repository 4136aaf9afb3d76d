"""Eviction policies for the expert cache: which resident expert gives up its block.

Policies keep bookkeeping on expert ids only; the cache decides which entries may be evicted at
all (not pinned, not loading, not protected) and asks the policy to choose among those.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

ExpertKey = tuple[int, int]  # (layer, expert)
Evictable = Callable[[ExpertKey], bool]


class EvictionPolicy:
    """Base: LRU order plus no-op hooks. Subclasses override `victim` and the hooks they need."""

    name = "base"

    def __init__(self) -> None:
        self.order: OrderedDict[ExpertKey, None] = OrderedDict()  # least recently used first

    def on_insert(self, key: ExpertKey) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def on_access(self, key: ExpertKey) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def on_evict(self, key: ExpertKey) -> None:
        self.order.pop(key, None)

    def on_low_precision_use(self, key: ExpertKey) -> None:
        """A layer ran a low-precision copy of `key` instead of this cache's (miss_precision)."""

    def on_route(self, layer: int, logits: torch.Tensor) -> None:
        """A layer routed: logits [T, E] are its router's gate logits."""

    def on_token(self) -> None:
        """A decode step (one token per live sequence) began."""

    def on_request(self) -> None:
        """A request began while no other was running (per-sequence statistics reset)."""

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        return self._first(self.order, evictable)

    @staticmethod
    def _first(keys: Iterable[ExpertKey], evictable: Evictable) -> ExpertKey | None:
        for key in keys:
            if evictable(key):
                return key
        return None

    def _lowest(self, score: Callable[[ExpertKey], float], evictable: Evictable) -> ExpertKey | None:
        """Lowest score among evictable keys; ties go to the least recently used."""
        best, best_score = None, 0.0
        for key in self.order:
            if evictable(key):
                s = score(key)
                if best is None or s < best_score:
                    best, best_score = key, s
        return best


class LRUPolicy(EvictionPolicy):
    """lru: evict the expert whose last use is oldest."""

    name = "lru"


class LFUPolicy(EvictionPolicy):
    """lfu: evict the expert used least often since the engine opened (ties: LRU)."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.uses[key] = self.uses.get(key, 0) + 1

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        return self._lowest(lambda k: self.uses.get(k, 0), evictable)


class MRSPolicy(EvictionPolicy):
    """mrs (HybriMoE Minus Recent Score): S_e <- a*s_e + (1-a)*S_e for the top-p routing scores
    of each routed layer, (1-a)*S_e for the rest of that layer; evict the lowest S."""

    name = "mrs"

    def __init__(self, top_k: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = alpha
        self.p = 2 * top_k
        self.score: dict[int, torch.Tensor] = {}

    def on_route(self, layer: int, logits: torch.Tensor) -> None:
        s = torch.softmax(logits.float(), dim=-1).mean(0)  # [E]: the step's mean routing score
        keep = torch.zeros_like(s).scatter_(0, torch.topk(s, min(self.p, s.numel())).indices, 1.0)
        prev = self.score.get(layer, torch.zeros_like(s))
        self.score[layer] = self.alpha * s * keep + (1 - self.alpha) * prev

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        def score(key: ExpertKey) -> float:
            s = self.score.get(key[0])
            return float(s[key[1]]) if s is not None else 0.0

        return self._lowest(score, evictable)


class HobbitPolicy(EvictionPolicy):
    """hobbit: priority = w_lru*R/T + w_lfu*F/T + w_lhu*H/T + w_fld*(1 - ((l_t - l_i + L) mod L)/L),
    R last-use token, F uses this sequence, H high-precision uses, T tokens so far, l_t the
    layer now computing; evict the lowest. Statistics reset per sequence."""

    name = "hobbit"

    def __init__(self, num_layers: int, weights: tuple[float, float, float, float] = (0.3, 0.3, 0.1, 0.3)) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.w_lru, self.w_lfu, self.w_lhu, self.w_fld = weights
        self.tokens = 0
        self.current_layer = 0
        self.last: dict[ExpertKey, int] = {}
        self.freq: dict[ExpertKey, int] = {}
        self.high: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.last[key] = self.tokens
        self.freq[key] = self.freq.get(key, 0) + 1
        self.high[key] = self.high.get(key, 0) + 1  # this cache holds the high-precision copy

    def on_low_precision_use(self, key: ExpertKey) -> None:
        self.last[key] = self.tokens
        self.freq[key] = self.freq.get(key, 0) + 1

    def on_route(self, layer: int, logits: torch.Tensor) -> None:
        self.current_layer = layer

    def on_token(self) -> None:
        self.tokens += 1

    def on_request(self) -> None:
        self.tokens = 0
        self.last.clear()
        self.freq.clear()
        self.high.clear()

    def priority(self, key: ExpertKey) -> float:
        t = max(1, self.tokens)
        fld = 1 - ((self.current_layer - key[0] + self.num_layers) % self.num_layers) / self.num_layers
        return (
            self.w_lru * self.last.get(key, 0) / t
            + self.w_lfu * self.freq.get(key, 0) / t
            + self.w_lhu * self.high.get(key, 0) / t
            + self.w_fld * fld
        )

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        return self._lowest(self.priority, evictable)


class _ARC:
    """Adaptive replacement order for one layer (Megiddo & Modha): T1 seen once, T2 seen again,
    ghost lists B1/B2 steer the target size p of T1."""

    def __init__(self, capacity: int) -> None:
        self.c = max(1, capacity)
        self.p = 0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def insert(self, e: int) -> None:
        if e in self.b1:
            self.p = min(self.c, self.p + max(1, len(self.b2) // max(1, len(self.b1))))
            del self.b1[e]
            self.t2[e] = None
        elif e in self.b2:
            self.p = max(0, self.p - max(1, len(self.b1) // max(1, len(self.b2))))
            del self.b2[e]
            self.t2[e] = None
        else:
            self.t1[e] = None

    def access(self, e: int) -> None:
        if e in self.t1:
            del self.t1[e]
            self.t2[e] = None
        elif e in self.t2:
            self.t2.move_to_end(e)

    def evict(self, e: int) -> None:
        if e in self.t1:
            del self.t1[e]
            self.b1[e] = None
        elif e in self.t2:
            del self.t2[e]
            self.b2[e] = None
        for ghost in (self.b1, self.b2):
            while len(ghost) > self.c:
                ghost.popitem(last=False)

    def candidates(self) -> list[int]:
        """Eviction order: the LRU end of T1 first while T1 exceeds p, else of T2."""
        first, second = (self.t1, self.t2) if len(self.t1) > self.p else (self.t2, self.t1)
        return list(first) + list(second)


class ShallowPolicy(EvictionPolicy):
    """shallow (Fate): keep every expert of the first MoE layers (up to 4) when they fit, spread
    the rest of the slots evenly over the deeper layers, and order evictions by ARC in each layer."""

    name = "shallow"

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, top_k: int, slots: int) -> None:
        super().__init__()
        n = len(moe_layers)
        shallow = 0
        while shallow < min(4, n) and (shallow + 1) * num_experts + (n - shallow - 1) * top_k <= slots:
            shallow += 1
        rest = n - shallow
        per_deep = (slots - shallow * num_experts) // rest if rest else 0
        self.quota = {layer: (num_experts if i < shallow else per_deep) for i, layer in enumerate(moe_layers)}
        self.arc = {layer: _ARC(q) for layer, q in self.quota.items()}
        self.count = dict.fromkeys(moe_layers, 0)

    def on_insert(self, key: ExpertKey) -> None:
        super().on_insert(key)
        self.arc[key[0]].insert(key[1])
        self.count[key[0]] += 1

    def on_access(self, key: ExpertKey) -> None:
        super().on_access(key)
        self.arc[key[0]].access(key[1])

    def on_evict(self, key: ExpertKey) -> None:
        if key in self.order:
            self.count[key[0]] -= 1
        super().on_evict(key)
        self.arc[key[0]].evict(key[1])

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        over = sorted(self.count, key=lambda layer: self.quota[layer] - self.count[layer])
        for layer in over:  # the layer furthest over its quota first
            for e in self.arc[layer].candidates():
                if evictable((layer, e)):
                    return (layer, e)
        return super().victim(evictable)


class PredictedPolicy(EvictionPolicy):
    """predicted: evict the expert the predictor expects farthest away (or never), the least
    likely among equals, the least recently used among those."""

    name = "predicted"

    def __init__(self) -> None:
        super().__init__()
        self.upcoming: Callable[[ExpertKey], tuple[int, float] | None] = lambda key: None

    def victim(self, evictable: Evictable) -> ExpertKey | None:
        best, best_rank = None, None
        for i, key in enumerate(self.order):
            if not evictable(key):
                continue
            upcoming = self.upcoming(key)
            rank = (-(1 << 30), 0.0, i) if upcoming is None else (-upcoming[0], upcoming[1], i)
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        return best


def make_policy(name: str, *, moe_layers: tuple[int, ...], num_layers: int, num_experts: int, top_k: int,
                slots: int) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "mrs":
        return MRSPolicy(top_k)
    if name == "hobbit":
        return HobbitPolicy(num_layers)
    if name == "shallow":
        return ShallowPolicy(moe_layers, num_experts, top_k, slots)
    assert name == "predicted", name  # EngineConfig validated it against config.POLICIES
    return PredictedPolicy()

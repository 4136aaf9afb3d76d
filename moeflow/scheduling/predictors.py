"""Expert predictors: from what is known now, which experts will coming layers (and tokens) use.

A Predictor is shared by the engine; `track(prompt)` gives the per-sequence state that sees the
sequence's steps. Predictions map a MoE layer to (expert, score) pairs, best first.

A layer reads device results back once (the router's choice); a predictor that computes on the
device does so in `guess`, before that read, and gets the host copy of its guess, read in the
same transfer, in `after_route`. Nothing here reads the device itself.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from moeflow.scheduling.routers import EntryInputs, RouterTable

Prediction = dict[int, list[tuple[int, float]]]  # layer -> [(expert, score)], best first


Guess = list[Any] | None  # the host copy of what `guess` computed (nested lists), or None


class SequencePredictor(Protocol):
    def begin_step(self, ids: list[int]) -> Prediction:
        """The step's input tokens are known; predict any layers of this step (and beyond)."""

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Device work on layer `layer`'s gate input x [T, H], read back with its routing."""

    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        """Layer `layer` routed to ids [T][K] (host lists); `guess` is the host copy of what
        `guess` returned. Predict later layers."""


class Predictor(Protocol):
    name: str
    wraps: bool  # predicts the next token's layers too (distance wraps around the layer stack)

    def track(self, prompt: list[int]) -> SequencePredictor: ...


class _Nothing:
    def begin_step(self, ids: list[int]) -> Prediction:
        return {}

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        return {}


class NoPredictor:
    """prefetch='none': load on demand only."""

    name = "none"
    wraps = False

    def track(self, prompt: list[int]) -> SequencePredictor:
        return _Nothing()


def _votes(ids: list[list[int]], weights: list[list[float]] | None = None) -> list[tuple[int, float]]:
    """Experts of a [T][K] selection ordered by how many tokens chose them (or summed weight)."""
    if len(ids) == 1:  # one token: its own ranking (the common decode case, kept cheap)
        w = weights[0] if weights is not None else [1.0] * len(ids[0])
        return sorted(zip(ids[0], w, strict=True), key=lambda p: -p[1])
    scores: dict[int, float] = {}
    for t, row in enumerate(ids):
        for i, e in enumerate(row):
            scores[e] = scores.get(e, 0.0) + (weights[t][i] if weights is not None else 1.0)
    return sorted(scores.items(), key=lambda p: -p[1])


class _LastToken(_Nothing):
    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        # The token just routed predicts the same experts for the next token at this layer
        # (one whole layer stack ahead).
        return {layer: _votes(ids[-1:])}


class LastTokenPredictor:
    """prefetch='last-token': the next token uses the experts the previous token used at each layer."""

    name = "last-token"
    wraps = True

    def track(self, prompt: list[int]) -> SequencePredictor:
        return _LastToken()


class EntryTable:
    """Per token, the first MoE layer's top-`width` experts and scores as its router ranks the
    token's normalized embedding (routers.EntryInputs): a guess known when the step's tokens
    are, before the layers below that router run, where the lookahead from a hidden state
    has nothing to go on (the first MoE layer of every step). Early layers route largely by
    the token itself, so it guesses well (README: prefetch).

    Built on the host: where the embedding lives on a device, the whole vocabulary's table is
    made at once when the engine opens (no device read in a step); on the CPU, a token's row
    is made the first time it is seen (no cost at open for a large vocabulary)."""

    CHUNK = 4096  # tokens normalized and routed at once

    def __init__(self, entry: EntryInputs, router: torch.Tensor, width: int) -> None:
        self.entry = entry
        self.router = router
        self.width = min(width, router.shape[0])
        vocab = entry.embed.shape[0]
        self.experts = torch.zeros(vocab, self.width, dtype=torch.int32)
        self.scores = torch.zeros(vocab, self.width, dtype=torch.float32)
        self.known = torch.zeros(vocab, dtype=torch.bool)
        self.vocab = vocab
        if entry.embed.device.type != "cpu":
            for start in range(0, vocab, self.CHUNK):
                self._fill(torch.arange(start, min(start + self.CHUNK, vocab)))

    def _fill(self, tokens: torch.Tensor) -> None:
        e = self.entry
        x = e.embed[tokens.to(e.embed.device)].float()
        if e.norm_bias is None:
            x = F.rms_norm(x, (x.shape[-1],), e.norm_weight.float(), e.eps)
        else:
            x = F.layer_norm(x, (x.shape[-1],), e.norm_weight.float(), e.norm_bias.float(), e.eps)
        top = torch.topk(F.linear(x, self.router.float()), self.width, dim=-1)  # the ranking of any scoring
        self.experts[tokens] = top.indices.to("cpu", torch.int32)
        self.scores[tokens] = torch.softmax(top.values, dim=-1).to("cpu")
        self.known[tokens] = True

    def votes(self, ids: list[int]) -> list[tuple[int, float]]:
        """The experts the step's tokens guess, best first: one token's ranking, or several
        tokens' summed scores (every expert some token guesses)."""
        ids = [t for t in ids if 0 <= t < self.vocab]  # an id the embedding refuses fails in the step, not here
        if not ids:
            return []
        if len(ids) == 1:
            (t,) = ids
            if not self.known[t]:
                self._fill(torch.tensor([t]))
            return list(zip(self.experts[t].tolist(), self.scores[t].tolist(), strict=True))
        tokens = torch.tensor(ids)
        todo = tokens[~self.known[tokens]].unique()
        if todo.numel():
            self._fill(todo)
        summed = torch.zeros(self.router.shape[0]).index_add_(0, self.experts[tokens].flatten().long(),
                                                             self.scores[tokens].flatten())
        return [(e, score) for e, score in enumerate(summed.tolist()) if score > 0]


class _GateLookahead(_Nothing):
    def __init__(self, owner: GateLookaheadPredictor) -> None:
        self.owner = owner

    def begin_step(self, ids: list[int]) -> Prediction:
        table = self.owner.entry
        if table is None:
            return {}
        votes = table.votes(ids)
        return {self.owner.first: sorted(votes, key=lambda p: -p[1])} if votes else {}

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """One token: [1, d, 2g], per coming layer the top-g experts then their scores (g =
        `guesses`, at least k+1; expert ids are small integers, exact in float32: one tensor,
        one read). Several tokens
        (a prompt, a batch): [d, E], each expert's summed score over the tokens that have it in
        their top-g, voted on the device so the read stays small whatever the token count."""
        o = self.owner
        targets = o.next_layers.get(layer, ())
        if not targets:
            return None
        weight = o.stacked[layer]  # [d*E, H]: the next d routers in one matrix
        logits = F.linear(x.to(weight.dtype), weight).float().view(x.shape[0], len(targets), -1)  # [T, d, E]
        scores = torch.sigmoid(logits) if o.sigmoid else torch.softmax(logits, dim=-1)
        top = torch.topk(scores, min(o.guesses, scores.shape[-1]), dim=-1)
        if x.shape[0] == 1:
            return torch.cat([top.indices.float(), top.values], dim=-1)
        d = len(targets)
        votes = torch.zeros(d, scores.shape[-1], device=scores.device)
        return votes.scatter_add_(1, top.indices.transpose(0, 1).reshape(d, -1),
                                  top.values.transpose(0, 1).reshape(d, -1))

    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        if guess is None:
            return {}
        targets = self.owner.next_layers[layer]
        out: Prediction = {}
        if len(ids) > 1:  # votes [d][E] (see guess): every expert some token has, by summed score
            for i, target in enumerate(targets):
                voted = [(e, score) for e, score in enumerate(guess[i]) if score > 0]
                out[target] = sorted(voted, key=lambda p: -p[1])
            return out
        (token,) = guess  # [d][2g]
        for i, target in enumerate(targets):
            width = len(token[i]) // 2
            out[target] = _votes([[int(e) for e in token[i][:width]]], [token[i][width:]])
        return out


class GateLookaheadPredictor:
    """prefetch='gate-lookahead' (Fate / HOBBIT): apply the next layers' routers to this layer's
    gate input, top-g per token (g = the prefetch width, at least k+1), experts ordered by
    votes; the first MoE layer of a step, which no layer precedes, from the step's tokens
    (EntryTable). No training."""

    name = "gate-lookahead"
    wraps = False

    def __init__(self, routers: RouterTable, depth: int, width: int | None = None) -> None:
        self.k = routers.top_k
        self.guesses = max(self.k + 1, width or 0)  # ranked guesses per token and layer
        self.sigmoid = routers.scoring == "sigmoid"
        moe = list(routers.moe_layers)
        self.first = moe[0]
        self.entry = (EntryTable(routers.entry, routers.weights[self.first], self.guesses)
                      if routers.entry is not None else None)
        self.next_layers: dict[int, tuple[int, ...]] = {}
        self.stacked: dict[int, torch.Tensor] = {}
        for pos, layer in enumerate(moe):
            targets = tuple(moe[pos + 1 : pos + 1 + depth])
            if targets:
                self.next_layers[layer] = targets
                self.stacked[layer] = torch.cat([routers.weights[t] for t in targets]).to(routers.dtype)

    def track(self, prompt: list[int]) -> SequencePredictor:
        return _GateLookahead(self)


class _EAMTracker:
    def __init__(self, owner: EAMPredictor) -> None:
        self.owner = owner
        self.matrix = torch.zeros(len(owner.moe_layers), owner.num_experts)

    def begin_step(self, ids: list[int]) -> Prediction:
        return self._predict(-1)

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        row = self.owner.row[layer]
        flat = torch.tensor([e for token in ids for e in token])
        self.matrix[row].index_add_(0, flat, torch.ones(flat.numel()))
        return self._predict(row)

    def _predict(self, row: int) -> Prediction:
        """The best-matching stored matrix's experts for the next `depth` layers (wrapping into
        the next token), scored (p + eps) * (1 - distance / (L + 1))."""
        o = self.owner
        stored = o.stacked()
        if stored is None:
            return {}
        current = self.matrix.flatten()
        if current.sum() == 0:
            best = stored.sum(0)  # no evidence yet: the pooled history
        else:
            best = stored[int(torch.argmax(F.cosine_similarity(stored, current[None], dim=-1)))]
        n = len(o.moe_layers)
        best = best.view(n, o.num_experts)
        probs = best / best.sum(-1, keepdim=True).clamp(min=1)
        rows = [(row + i) % n for i in range(1, o.depth + 1)]
        top = torch.topk(probs[rows] + 1e-6, min(o.k + 1, o.num_experts), dim=-1)
        out: Prediction = {}
        for i, (experts, values) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
            weight = 1 - (i + 1) / (n + 1)
            out[o.moe_layers[rows[i]]] = [(e, v * weight) for e, v in zip(experts, values, strict=True)]
        return out

    def finish(self) -> None:
        if self.matrix.sum() > 0:
            self.owner.remember(self.matrix.flatten().clone())


class EAMPredictor:
    """prefetch='eam' (MoE-Infinity): match the request's expert activation matrix (layers x
    experts counts) against those of past requests by cosine similarity; predict by the match."""

    name = "eam"
    wraps = True

    def __init__(self, routers: RouterTable, depth: int, capacity: int = 120) -> None:
        self.moe_layers = routers.moe_layers
        self.row = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.num_experts = routers.num_experts
        self.k = routers.top_k
        self.depth = min(depth, len(self.moe_layers))
        self.history: deque[torch.Tensor] = deque(maxlen=capacity)
        self._stacked: torch.Tensor | None = None

    def remember(self, matrix: torch.Tensor) -> None:
        self.history.append(matrix)
        self._stacked = None

    def stacked(self) -> torch.Tensor | None:
        """The stored matrices as one [N, L*E] tensor (rebuilt only when a request ends)."""
        if self._stacked is None and self.history:
            self._stacked = torch.stack(list(self.history))
        return self._stacked

    def track(self, prompt: list[int]) -> _EAMTracker:
        return _EAMTracker(self)

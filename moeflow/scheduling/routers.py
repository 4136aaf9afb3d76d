"""The routers as predictors see them: each MoE layer's gate weights and how its scores are made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from moeflow.errors import ConfigError

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True, eq=False)
class EntryInputs:
    """What the first MoE layer's router can see of a token before any layer has run: its
    embedding row, normalized by the norm in front of that router (the layers below it left out).
    The gate lookahead guesses the first MoE layer of a step from it as soon as the step's tokens
    are known, a layer earlier than any hidden state could (see predictors.EntryTable)."""

    embed: torch.Tensor  # [V, H], the model's own (not copied), on the compute device
    norm_weight: torch.Tensor  # [H]
    norm_bias: torch.Tensor | None  # LayerNorm families; None: RMSNorm
    eps: float

    def __post_init__(self) -> None:
        if self.embed.dim() != 2 or self.norm_weight.shape != (self.embed.shape[1],):
            raise ConfigError(
                f"entry inputs: embedding of shape {list(self.embed.shape)} and norm weight of shape "
                f"{list(self.norm_weight.shape)}, expected [V, H] and [H]"
            )


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity, never tensor by tensor
class RouterTable:
    """Plain data about a model's routers, built by whoever holds the model (the session), so that
    scheduling never imports the runtime's model."""

    moe_layers: tuple[int, ...]  # ascending
    num_experts: int
    top_k: int
    scoring: str  # 'softmax' | 'sigmoid': how gate logits become scores
    dtype: torch.dtype  # the compute dtype the predictors apply the weights in
    weights: Mapping[int, torch.Tensor]  # MoE layer -> gate weight [E, H], on the compute device
    entry: EntryInputs | None = None  # the first MoE layer's view of a bare token (None: not known)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ConfigError(f"router scoring {self.scoring!r}: expected one of {', '.join(SCORINGS)}")
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"top_k {self.top_k}: expected 1 to num_experts ({self.num_experts})")
        if tuple(sorted(self.weights)) != self.moe_layers:
            raise ConfigError(f"router weights of layers {sorted(self.weights)} but MoE layers {list(self.moe_layers)}")
        for layer, w in self.weights.items():
            if w.dim() != 2 or w.shape[0] != self.num_experts:
                raise ConfigError(
                    f"layer {layer}: router weight of shape {list(w.shape)}, expected [{self.num_experts}, hidden]"
                )
        first = self.weights[self.moe_layers[0]]
        if self.entry is not None and self.entry.embed.shape[1] != first.shape[1]:
            raise ConfigError(
                f"entry inputs of hidden size {self.entry.embed.shape[1]} but layer {self.moe_layers[0]}'s router "
                f"takes {first.shape[1]}"
            )


def router_table(weights: Mapping[int, torch.Tensor], *, top_k: int, scoring: str, dtype: torch.dtype,
                 entry: EntryInputs | None = None) -> RouterTable:
    """The table of gate weights {MoE layer: [E, H]}; E is read from the weights and must agree."""
    if not weights:
        raise ConfigError("a router table needs at least one MoE layer's router weight")
    experts = {int(w.shape[0]) for w in weights.values()}
    if len(experts) != 1:
        raise ConfigError(f"router weights disagree on the number of experts: {sorted(experts)}")
    return RouterTable(
        moe_layers=tuple(sorted(weights)),
        num_experts=experts.pop(),
        top_k=top_k,
        scoring=scoring,
        dtype=dtype,
        weights=MappingProxyType(dict(weights)),
        entry=entry,
    )

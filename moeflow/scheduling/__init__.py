"""Scheduling: predictors of coming experts, the prefetch scheduler, routing traces, prediction metrics."""

from __future__ import annotations

from pathlib import Path

from moeflow.errors import ConfigError, PredictorError
from moeflow.scheduling import expertflow
from moeflow.scheduling.predictors import (
    EAMPredictor,
    GateLookaheadPredictor,
    LastTokenPredictor,
    NoPredictor,
    Predictor,
)
from moeflow.scheduling.routers import RouterTable, router_table
from moeflow.scheduling.scheduler import Scheduler

__all__ = ["Predictor", "RouterTable", "Scheduler", "make_predictor", "router_table"]


def make_predictor(name: str, routers: RouterTable, depth: int, predictor_dir: Path, signature: str,
                   width: int | None = None) -> Predictor:
    """The predictor called `name`; 'auto' is the trained routing predictor when one is saved
    in `predictor_dir`, else the gate lookahead."""
    if name == "none":
        return NoPredictor()
    if name == "last-token":
        return LastTokenPredictor()
    if name == "gate-lookahead":
        return GateLookaheadPredictor(routers, depth, width)
    if name == "eam":
        return EAMPredictor(routers, depth)
    if name in ("expertflow", "auto"):
        trained = expertflow.load(predictor_dir, signature)
        if trained is not None:
            return expertflow.ExpertFlowPredictor(trained, str(predictor_dir / expertflow.WEIGHTS))
        if name == "auto":
            return GateLookaheadPredictor(routers, depth, width)
        raise PredictorError(
            f"{predictor_dir / expertflow.WEIGHTS}: no trained routing predictor; record traces with "
            f"`moeflow trace` and train one with `moeflow train-predictor`"
        )
    raise ConfigError(f"prefetch={name!r}: unknown predictor")

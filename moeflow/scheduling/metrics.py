"""Prediction quality: precision and recall of each predictor by how far ahead it predicted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Tally:
    true_positive: int = 0
    predicted: int = 0
    actual: int = 0

    def add(self, predicted: set[int], actual: set[int]) -> None:
        self.true_positive += len(predicted & actual)
        self.predicted += len(predicted)
        self.actual += len(actual)

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positive / self.actual if self.actual else 0.0


@dataclass
class PredictionMetrics:
    """Tallies at 1..depth MoE layers ahead, and for predictions made during the previous token."""

    depth: int
    by_distance: dict[int, _Tally] = field(default_factory=dict)
    next_token: _Tally = field(default_factory=_Tally)

    def record(self, distance: int, predicted: set[int], actual: set[int]) -> None:
        """A prediction made `distance` MoE layers before the layer routed."""
        if 1 <= distance <= self.depth:
            self.by_distance.setdefault(distance, _Tally()).add(predicted, actual)

    def record_next_token(self, predicted: set[int], actual: set[int]) -> None:
        """A prediction made while the previous token was computed."""
        self.next_token.add(predicted, actual)

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in range(1, self.depth + 1):
            t = self.by_distance.get(d, _Tally())
            out[f"precision_{d}_ahead"] = round(t.precision, 4)
            out[f"recall_{d}_ahead"] = round(t.recall, 4)
        out["precision_next_token"] = round(self.next_token.precision, 4)
        out["recall_next_token"] = round(self.next_token.recall, 4)
        return out

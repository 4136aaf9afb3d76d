"""Token regrouping (ExpertFlow's token scheduler, one step at a time): when more decode sequences
wait than a step takes, which of them step together.

Each sequence carries its recent routing path as a bit mask over (layer, expert): the experts its
last token used, the best cheap guess of what its next token uses (ExpertFlow predicts the same
L x E pattern with a model; consecutive tokens agree on much of it). A step is built greedily:
first every sequence that has waited `max_wait` steps (oldest first: nobody starves), then,
again and again, the waiting sequence that adds the fewest experts to those already covered (the
resident ones and the chosen sequences' paths), the older on a tie. Sequences whose experts are
resident go ahead while the others wait for a step that loads what they share, so each load
serves more tokens: the Hamming-similarity grouping of ExpertFlow, done incrementally.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    age: int  # steps it has waited
    route: int  # its recent path: bit (layer * experts + expert)


def overdue(candidates: list[Candidate], take: int, max_wait: int) -> list[int]:
    """The indices of at most `take` candidates that waited `max_wait` steps or more, oldest first."""
    return sorted((i for i, c in enumerate(candidates) if c.age >= max_wait), key=lambda i: -candidates[i].age)[:take]


def regroup(candidates: list[Candidate], take: int, resident: int, max_wait: int) -> list[int]:
    """The indices (into `candidates`, in arrival order) of at most `take` sequences to step."""
    if len(candidates) <= take:
        return list(range(len(candidates)))
    chosen = overdue(candidates, take, max_wait)
    covered = resident
    for i in chosen:
        covered |= candidates[i].route
    left = [i for i in range(len(candidates)) if i not in set(chosen)]
    while len(chosen) < take and left:
        best = min(left, key=lambda i: ((candidates[i].route & ~covered).bit_count(), -candidates[i].age, i))
        chosen.append(best)
        left.remove(best)
        covered |= candidates[best].route
    return sorted(chosen)

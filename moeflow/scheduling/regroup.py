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

A chosen step may then split (`resident_first`): the sequences whose path lies inside the resident
experts run first as a step of their own, while the others' missing experts (`route_keys`) load.
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


def resident_first(routes: list[int], resident: int) -> list[int]:
    """The indices of the sequences predicted to need only resident experts: a known path (not 0,
    which means none yet, e.g. a prompt) with no bit outside `resident`."""
    return [i for i, route in enumerate(routes) if route and not route & ~resident]


def route_keys(bits: int, experts: int) -> list[tuple[int, int]]:
    """The (layer, expert) of every bit of a path mask, nearest layer first (the order a pass needs them)."""
    keys = []
    while bits:
        low = bits & -bits
        layer, expert = divmod(low.bit_length() - 1, experts)
        keys.append((layer, expert))
        bits ^= low
    return keys

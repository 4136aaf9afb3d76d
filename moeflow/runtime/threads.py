"""CPU thread plan of a decode step: small ops on one thread, weight streams on all of them.

On a machine with few cores (often hyperthread siblings), an OpenMP worker that spin-waits
between tiny ops slows the thread doing the work; decode is hundreds of tiny ops around a few
large matrix-vector products. So a decode step runs narrow (one thread) and widens only for the
products that stream a whole weight matrix (experts, dense MLPs, lm_head), where a second
thread adds memory bandwidth. torch.set_num_threads costs well under a microsecond.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


# Below this many weight bytes a product is over before a second thread helps.
WIDE_MIN_BYTES = 2 << 20
_UNCHANGED: AbstractContextManager[None] = nullcontext()


class ThreadPlan:
    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        self.narrowed = False

    def narrow(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(1)
            self.narrowed = True

    def restore(self) -> None:
        if self.narrowed:
            torch.set_num_threads(self.threads)
            self.narrowed = False

    def wide(self, weight_bytes: int = WIDE_MIN_BYTES) -> AbstractContextManager[None]:
        """All threads for the enclosed product of `weight_bytes` of weights, if the step is
        narrowed and the weights are large enough to gain from it. The common answer (nothing to
        do) is one shared null context: this is asked for every expert of every layer."""
        if not self.narrowed or weight_bytes < WIDE_MIN_BYTES:
            return _UNCHANGED
        return self._widened()

    @contextmanager
    def _widened(self) -> Iterator[None]:
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

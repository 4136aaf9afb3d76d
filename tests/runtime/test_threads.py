"""The decode thread plan: narrow for small ops, all threads only for large weight streams."""

from __future__ import annotations

import torch

from moeflow.runtime.threads import WIDE_MIN_BYTES, ThreadPlan


def test_wide_restores_all_threads_only_for_large_weights_of_a_narrowed_step() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = ThreadPlan()
        with plan.wide(WIDE_MIN_BYTES):
            assert torch.get_num_threads() == 2  # not narrowed: nothing changes
        plan.narrow()
        assert torch.get_num_threads() == 1
        with plan.wide(WIDE_MIN_BYTES - 1):
            assert torch.get_num_threads() == 1
        with plan.wide(WIDE_MIN_BYTES):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        plan.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

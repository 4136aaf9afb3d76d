"""The benchmarks' physics check refuses figures that beat the link's peak, and only those."""

from __future__ import annotations

import pytest
import torch

from benches import physics

GB = 1e9


def test_a_figure_at_or_below_the_peak_passes_with_its_rate() -> None:
    assert physics.check_rate("h2d", 50 * GB, 1.0, 55 * GB) == pytest.approx(50 * GB)
    assert physics.check_rate("h2d", 57 * GB, 1.0, 55 * GB) == pytest.approx(57 * GB)  # within 5%
    assert physics.check_rate("idle", 0, 0.0, 55 * GB) == 0.0


def test_the_issue_figure_is_refused_and_names_itself() -> None:
    # 77 misses of 352 MB experts in 0.15 s over a 55 GB/s link (issue 9)
    with pytest.raises(physics.PhysicsViolation, match="decode h2d.*above the link's measured peak") as e:
        physics.check_rate("decode h2d", 77 * 352e6, 0.15, 55 * GB)
    assert e.value.bytes_moved == 77 * 352e6 and e.value.peak == 55 * GB
    assert physics.refusal("decode h2d", 77 * 352e6, 0.15, 55 * GB) is not None
    assert physics.refusal("decode h2d", 352e6, 0.15, 55 * GB) is None


def test_bytes_in_no_time_and_bad_inputs_are_refused() -> None:
    with pytest.raises(physics.PhysicsViolation):
        physics.check_rate("instant", 1.0, 0.0, 55 * GB)
    with pytest.raises(ValueError, match="peak=0"):
        physics.check_rate("h2d", 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="negative"):
        physics.check_rate("h2d", -1.0, 1.0, 1.0)


def test_the_sim_peak_is_its_configured_bandwidth_and_cpu_has_none() -> None:
    assert physics.link_peak("sim", sim_bandwidth=8e9) == 8e9
    with pytest.raises(ValueError, match="sim_bandwidth"):
        physics.link_peak("sim")
    with pytest.raises(ValueError, match="'cpu'"):
        physics.link_peak("cpu")


@pytest.mark.gpu
def test_the_measured_pinned_peak_is_a_plausible_link() -> None:
    peak = physics.pinned_h2d_peak(64 << 20, runs=2)
    assert 1 * GB < peak < 2000 * GB, peak  # PCIe gen3 x4 .. beyond NVLink-C2C
    assert torch.cuda.is_available()

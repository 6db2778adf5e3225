"""Arrival generators: mean gap 1/rate, CV 1/sqrt(burstiness), vLLM's rescaling, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from drift_agent.bench.arrivals import arrival_times, gamma_gaps


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gap_statistics(burstiness: float) -> None:
    gaps = gamma_gaps(40_000, rate=4.0, burstiness=burstiness, seed=1)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_poisson_gaps_are_exponential() -> None:
    gaps = gamma_gaps(5_000, rate=2.0, burstiness=1.0, seed=3)
    assert stats.kstest(gaps, "expon", args=(0, 0.5)).pvalue > 0.01
    assert stats.kstest(gaps, "expon", args=(0, 0.25)).pvalue < 1e-6  # and the test can tell the rate apart


def test_arrival_times_rescaled_to_n_over_rate() -> None:
    t = arrival_times(1000, rate=5.0, burstiness=0.5, seed=7)
    assert t[-1] == pytest.approx(200.0)
    assert np.all(np.diff(t) >= 0) and t[0] > 0
    assert np.array_equal(t, arrival_times(1000, 5.0, 0.5, seed=7))
    assert not np.array_equal(t, arrival_times(1000, 5.0, 0.5, seed=8))


def test_rates_scale_one_schedule() -> None:
    # Same seed: a sweep sees one arrival pattern compressed or stretched, never a different one.
    assert np.allclose(arrival_times(50, 2.0, 1.0, seed=0), arrival_times(50, 1.0, 1.0, seed=0) / 2)


def test_infinite_rate_and_burstiness() -> None:
    assert np.array_equal(arrival_times(5, math.inf), np.zeros(5))
    assert np.allclose(arrival_times(4, 2.0, math.inf), [0.5, 1.0, 1.5, 2.0])
    assert arrival_times(0, 1.0).size == 0


@pytest.mark.parametrize(("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_rejects_bad_parameters(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        arrival_times(3, rate, burstiness)

"""Bisection for the max rate at a target attainment, on synthetic monotone curves."""

from __future__ import annotations

import pytest

from drift_agent.bench.sweep import Bisection, find_max_rate


def smooth(rate: float) -> float:
    return 1.0 / (1.0 + (rate / 10.0) ** 4)  # crosses 0.9 at 10 * (1/9) ** 0.25 ~= 5.77


def test_finds_the_crossing_of_a_smooth_curve() -> None:
    res = find_max_rate(smooth, lo=0.5, hi=64, target=0.9, max_iters=20, rel_tol=0.01)
    exact = 10 * (1 / 9) ** 0.25
    assert res.saturated and res.max_rate is not None
    assert smooth(res.max_rate) >= 0.9
    assert exact / 1.01 <= res.max_rate <= exact
    assert res.history[0] == (64, smooth(64)) and res.history[1] == (0.5, smooth(0.5))


def test_step_curve_and_iteration_budget() -> None:
    res = find_max_rate(lambda r: 1.0 if r <= 7.3 else 0.4, lo=1, hi=100, max_iters=3, rel_tol=1e-6)
    assert len(res.history) == 2 + 3
    assert res.max_rate is not None and res.max_rate <= 7.3
    assert all(a >= 0.9 for r, a in res.history if r <= res.max_rate)


def test_upper_bound_already_meets_target() -> None:
    res = find_max_rate(lambda r: 0.95, lo=1, hi=8)
    assert (res.max_rate, res.saturated, len(res.history)) == (8, False, 1)


def test_lower_bound_misses_target() -> None:
    res = find_max_rate(lambda r: 0.5, lo=1, hi=8)
    assert res.max_rate is None and res.saturated and len(res.history) == 2
    assert res.to_dict()["history"][1] == {"request_rate": 1, "slo_attainment": 0.5}


def test_state_machine_is_driveable_step_by_step() -> None:
    search = Bisection(1, 16, target=0.9, max_iters=2)
    assert search.next_rate() == 16
    search.record(16, 0.1)
    assert search.next_rate() == 1
    search.record(1, 1.0)
    assert search.next_rate() == pytest.approx(4.0)  # geometric midpoint
    search.record(4.0, 0.95)
    assert search.next_rate() == pytest.approx(8.0)
    search.record(8.0, 0.5)
    assert search.next_rate() is None
    assert search.result().max_rate == pytest.approx(4.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lo": 0, "hi": 1},
        {"lo": 5, "hi": 2},
        {"lo": 1, "hi": float("inf")},
        {"lo": 1, "hi": 2, "target": 1.5},
    ],
)
def test_rejects_bad_bounds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Bisection(**kwargs)

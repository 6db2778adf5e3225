"""SLO classification and the sliding attainment window (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_agent.core.sequence import SLO, RequestTimes
from drift_agent.server.slo import PHASES, SloOutcome, SloWindow, classify, tpot_seconds


def times(first: float | None, finished: float | None, arrival: float = 0.0) -> RequestTimes:
    return RequestTimes(
        arrival=arrival, first_scheduled=arrival, first_token=first, last_token=finished, finished=finished
    )


def test_tpot_is_vllm_definition() -> None:
    assert tpot_seconds(times(0.5, 1.5), 11) == pytest.approx(0.1)
    assert tpot_seconds(times(0.5, 0.5), 1) is None


@pytest.mark.parametrize(
    ("slo", "t", "n", "expected"),
    [
        (SLO(1.0, 0.1), times(0.5, 1.5), 11, SloOutcome(True, True, True)),
        (SLO(0.4, 0.1), times(0.5, 1.5), 11, SloOutcome(False, True, False)),
        (SLO(1.0, 0.05), times(0.5, 1.5), 11, SloOutcome(True, False, False)),
        (SLO(0.1, 0.01), times(0.5, 1.5), 11, SloOutcome(False, False, False)),
        # Exactly on target counts as met.
        (SLO(0.5, 0.1), times(0.5, 1.5), 11, SloOutcome(True, True, True)),
        # One output token: no inter-token time, TPOT met whatever the target.
        (SLO(1.0, 1e-9), times(0.5, 0.5), 1, SloOutcome(True, True, True)),
        # No targets: nothing can be missed.
        (SLO(None, None), times(5.0, 50.0), 3, SloOutcome(True, True, True)),
    ],
)
def test_classify_finished(slo: SLO, t: RequestTimes, n: int, expected: SloOutcome) -> None:
    assert classify(slo, t, n) == expected


def test_classify_aborted_counts_only_decided_phases() -> None:
    slo = SLO(1.0, 0.1)
    # Aborted before its first token but after its TTFT target: a certain TTFT miss.
    assert classify(slo, times(None, None), 0, aborted=True, now=2.0) == SloOutcome(False, None, False)
    # Aborted early, target not yet passed: nothing is decided.
    assert classify(slo, times(None, None), 0, aborted=True, now=0.5) == SloOutcome(None, None, None)
    # First token in time, then aborted: TTFT met, TPOT and "both" undecided.
    assert classify(slo, times(0.2, None), 5, aborted=True, now=3.0) == SloOutcome(True, None, None)
    assert classify(slo, times(1.5, None), 5, aborted=True, now=3.0) == SloOutcome(False, None, False)


def test_window_attainment_and_expiry() -> None:
    w = SloWindow(10.0)
    assert w.attainment(0.0) == {"ttft": (1.0, 0), "tpot": (1.0, 0), "both": (1.0, 0)}
    w.record(SloOutcome(True, True, True), 1.0)
    w.record(SloOutcome(True, False, False), 2.0)
    w.record(SloOutcome(False, None, False), 3.0)
    w.record(SloOutcome(True, True, True), 4.0)
    assert w.attainment(5.0) == {"ttft": (0.75, 4), "tpot": (2 / 3, 3), "both": (0.5, 4)}
    assert w.attainment(12.5) == {"ttft": (0.5, 2), "tpot": (1.0, 1), "both": (0.5, 2)}  # first two expired
    assert w.attainment(100.0)["both"] == (1.0, 0)
    with pytest.raises(ValueError):
        SloWindow(0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 5),
            st.sampled_from([None, True, False]),
            st.sampled_from([None, True, False]),
            st.sampled_from([None, True, False]),
        ),
        max_size=40,
    ),
    st.floats(0.5, 3),
)
def test_the_windows_running_counts_equal_a_recount(events: list, window_s: float) -> None:
    """Counts kept as events enter and expire agree with counting the window's events from scratch."""
    w = SloWindow(window_s)
    now = 0.0
    recorded: list[tuple[float, SloOutcome]] = []
    for dt, ttft, tpot, both in events:
        now += dt
        outcome = SloOutcome(ttft, tpot, both)
        w.record(outcome, now)
        recorded.append((now, outcome))
        live = [o for t, o in recorded if t >= now - window_s]
        got = w.attainment(now)
        for phase in PHASES:
            flags = [met for o in live for p, met in o.items() if p == phase]
            assert got[phase][1] == len(flags)
            assert got[phase][0] == (sum(flags) / len(flags) if flags else 1.0)

"""Attainment from counter deltas: windows, resets, several pods, and parsing real exposition text."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from drift_operator.attainment import SampleWindow, Scrape, counter_increase, window_stats
from drift_operator.metrics import MetricsParseError, PodSample, parse_agent_metrics


def _sample(
    uid: str, met: float, missed: float, ttft_met: float | None = None, waiting: float = 0.0
) -> PodSample:
    ttft = met if ttft_met is None else ttft_met
    counts = {
        ("both", "met"): met,
        ("both", "missed"): missed,
        ("ttft", "met"): ttft,
        ("ttft", "missed"): met + missed - ttft,
        ("tpot", "met"): met + missed,
        ("tpot", "missed"): 0.0,
    }
    return PodSample(pod=uid, uid=uid, counts=counts, waiting=waiting)


def test_counter_increase_handles_resets() -> None:
    assert counter_increase([10, 15, 20]) == 10
    assert counter_increase([10, 15, 3, 8]) == 5 + 3 + 5  # reset to 0 then 3 requests
    assert counter_increase([5]) == 0 and counter_increase([]) == 0


def test_window_needs_two_scrapes() -> None:
    assert window_stats([], 100, 60) is None
    assert window_stats([Scrape(100, {"a": _sample("a", 10, 0)})], 100, 60) is None


def test_attainment_over_the_window_uses_the_baseline_before_it() -> None:
    scrapes = [
        Scrape(0, {"a": _sample("a", 0, 0)}),  # long before the window: ignored
        Scrape(30, {"a": _sample("a", 100, 0)}),  # newest scrape before the window start (40): baseline
        Scrape(50, {"a": _sample("a", 150, 10)}),
        Scrape(100, {"a": _sample("a", 180, 20, ttft_met=170)}),
    ]
    stats = window_stats(scrapes, now=100, window_s=60)
    assert stats is not None
    assert stats.duration_s == 70
    assert stats.met["both"] == 80 and stats.missed["both"] == 20
    assert stats.attainment("both") == pytest.approx(0.8)
    assert stats.attainment("ttft") == pytest.approx(70 / 100)
    assert stats.demand_rps == pytest.approx(100 / 70) and stats.goodput_rps == pytest.approx(80 / 70)


def test_pods_add_up_and_restarts_do_not_go_negative() -> None:
    scrapes = [
        Scrape(0, {"a": _sample("a", 100, 0), "b": _sample("b", 50, 50)}),
        Scrape(10, {"a": _sample("a", 110, 0), "b": _sample("b", 5, 5)}),  # b restarted
        Scrape(20, {"a": _sample("a", 120, 0), "b": _sample("b", 10, 10), "c": _sample("c", 3, 0)}),
    ]
    stats = window_stats(scrapes, now=20, window_s=60)
    assert stats is not None
    assert stats.met["both"] == 20 + (5 + 5) + 0  # c's first sample is only a baseline
    assert stats.missed["both"] == 5 + 5
    assert stats.pods == 3


def test_no_traffic_means_unknown_attainment_not_zero() -> None:
    scrapes = [Scrape(0, {"a": _sample("a", 10, 0)}), Scrape(10, {"a": _sample("a", 10, 0)})]
    stats = window_stats(scrapes, now=10, window_s=60)
    assert stats is not None and stats.total_requests == 0 and stats.overall is None


def test_overall_falls_back_to_the_worse_phase() -> None:
    a0 = PodSample(
        "a", "a", {("ttft", "met"): 0, ("ttft", "missed"): 0, ("tpot", "met"): 0, ("tpot", "missed"): 0}
    )
    a1 = PodSample(
        "a", "a", {("ttft", "met"): 9, ("ttft", "missed"): 1, ("tpot", "met"): 7, ("tpot", "missed"): 3}
    )
    stats = window_stats([Scrape(0, {"a": a0}), Scrape(1, {"a": a1})], now=1, window_s=60)
    assert stats is not None and stats.overall == pytest.approx(0.7)


def test_sample_window_keeps_one_scrape_before_the_window() -> None:
    window = SampleWindow()
    for t in range(0, 100, 10):
        window.add(Scrape(float(t), {}), keep_seconds=30)
    assert [s.time for s in window.scrapes] == [60, 70, 80, 90]
    bounded = SampleWindow(max_scrapes=3)
    for t in range(10):
        bounded.add(Scrape(float(t), {}), keep_seconds=1000)
    assert len(bounded.scrapes) == 3


def test_parse_agent_metrics_from_prometheus_client_output() -> None:
    registry = CollectorRegistry()
    slo = Counter("drift_slo_requests", "x", ["phase", "outcome", "model_name"], registry=registry)
    slo.labels("both", "met", "m1").inc(7)
    slo.labels("both", "met", "m2").inc(3)
    slo.labels("ttft", "missed", "m1").inc(2)
    share = Gauge("drift_partition_sm_share", "x", ["phase"], registry=registry)
    share.labels("prefill").set(0.6)
    share.labels("decode").set(0.4)
    Gauge("drift_policy_info", "x", ["policy"], registry=registry).labels("drift").set(1)
    Gauge("vllm:num_requests_waiting", "x", ["model_name"], registry=registry).labels("m1").set(4)
    Gauge("vllm:kv_cache_usage_perc", "x", ["model_name"], registry=registry).labels("m1").set(0.5)
    sample = parse_agent_metrics(generate_latest(registry).decode(), "pod-a", "uid-a")
    assert sample.counts[("both", "met")] == 10  # summed over model names
    assert sample.counts[("ttft", "missed")] == 2
    assert sample.prefill_share == pytest.approx(0.6) and sample.policy == "drift"
    assert sample.waiting == 4 and sample.kv_usage == 0.5 and sample.has_slo_counters


def test_parse_agent_metrics_without_drift_series() -> None:
    sample = parse_agent_metrics('vllm:num_requests_running{model_name="m"} 2\n', "p", "u")
    assert not sample.has_slo_counters and sample.running == 2 and sample.policy is None


def test_unparsable_metrics_raise_a_clear_error() -> None:
    with pytest.raises(MetricsParseError, match="pod-a"):
        parse_agent_metrics("this is { not prometheus", "pod-a", "u")

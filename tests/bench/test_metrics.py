"""Metric definitions on hand-made timelines (values worked out by hand from vLLM's formulas)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drift_agent.bench.metrics import GoodputTargets, RequestRecord, peak_output_and_concurrency, summarize


def timeline() -> list[RequestRecord]:
    return [
        # 4 tokens: TTFT 100 ms, then gaps 20/30/50 ms -> E2E 200 ms, TPOT (200-100)/3 ms.
        RequestRecord(
            "a",
            success=True,
            start_time=0.0,
            ttft=0.1,
            itl=[0.02, 0.03, 0.05],
            latency=0.2,
            prompt_tokens=10,
            output_tokens=4,
        ),
        # 1 token: no TPOT sample (and TPOT 0 for SLO checks).
        RequestRecord(
            "b", success=True, start_time=0.1, ttft=0.3, latency=0.3, prompt_tokens=20, output_tokens=1
        ),
        RequestRecord("c", success=False, error="HTTP 500", start_time=0.2, prompt_tokens=99),
        # 2 tokens: TPOT = 100 ms.
        RequestRecord(
            "d",
            success=True,
            start_time=0.4,
            ttft=0.05,
            itl=[0.1],
            latency=0.15,
            prompt_tokens=30,
            output_tokens=2,
        ),
    ]


def test_summary_matches_hand_computed_values() -> None:
    s = summarize(timeline(), duration_s=2.0, slo=GoodputTargets(ttft_ms=200, tpot_ms=50))
    assert (s["completed"], s["failed"], s["num_requests"]) == (3, 1, 4)
    assert s["total_input_tokens"] == 60  # the failed request's prompt is not counted
    assert s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(33.5)
    assert s["mean_ttft_ms"] == pytest.approx(150.0)
    assert s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["p90_ttft_ms"] == pytest.approx(np.percentile([100, 300, 50], 90))
    # TPOT only from requests with > 1 output token: 33.33 and 100 ms.
    assert s["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert s["p99_tpot_ms"] == pytest.approx(np.percentile([100 / 3, 100], 99))
    # ITL pooled over requests: 20, 30, 50, 100 ms.
    assert s["mean_itl_ms"] == pytest.approx(50.0)
    assert s["median_itl_ms"] == pytest.approx(40.0)
    assert s["std_itl_ms"] == pytest.approx(np.std([20, 30, 50, 100]))
    assert s["mean_e2el_ms"] == pytest.approx((200 + 300 + 150) / 3)
    # Only "a" meets both SLOs: "b" misses TTFT, "c" failed, "d" misses TPOT.
    assert s["request_goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.25)
    assert s["ttft_attainment"] == pytest.approx(0.5)  # a and d
    assert s["tpot_attainment"] == pytest.approx(0.5)  # a and b (1 token counts as TPOT 0)
    assert s["slo"] == {"ttft": 200.0, "tpot": 50.0}
    json.dumps(s, allow_nan=False)  # JSON-ready


def test_tpot_definition_and_slo_boundary() -> None:
    r = RequestRecord("x", success=True, ttft=0.2, latency=0.5, output_tokens=4)
    assert r.tpot == pytest.approx(0.1)
    assert GoodputTargets(ttft_ms=200, tpot_ms=100).meets(r)  # equal to the target meets it
    assert not GoodputTargets(ttft_ms=199.9).meets(r)
    assert not GoodputTargets(e2el_ms=499).meets(r)
    assert RequestRecord("y", success=True, ttft=0.1, latency=0.1, output_tokens=1).tpot is None
    assert RequestRecord("z", success=False, output_tokens=5, latency=1.0).tpot is None
    assert not GoodputTargets(ttft_ms=1e9).meets(RequestRecord("f", success=False))


def test_peak_tokens_per_second_and_concurrency() -> None:
    tokens, concurrency = peak_output_and_concurrency(timeline())
    assert tokens == 7  # every token chunk falls in the first second
    # a [0, .2), b [.1, .4), d [.4, .55): b ends exactly when d starts (half-open), so the peak is 2.
    assert concurrency == 2
    spread = [
        RequestRecord(
            "p", success=True, start_time=0.0, ttft=0.5, itl=[0.4, 0.4, 0.4], latency=1.7, output_tokens=4
        ),
        RequestRecord("q", success=True, start_time=1.0, ttft=0.1, itl=[0.1], latency=0.2, output_tokens=2),
    ]
    # token times: p at .5, .9, 1.3, 1.7; q at 1.1, 1.2 -> second 1 holds 4 chunks
    assert peak_output_and_concurrency(spread) == (4.0, 2)


def test_empty_sets_give_none_not_zero() -> None:
    s = summarize([RequestRecord("c", error="boom")], duration_s=1.0, slo=GoodputTargets(ttft_ms=100))
    assert s["completed"] == 0 and s["failed"] == 1
    assert s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    assert s["slo_attainment"] == 0.0 and s["max_concurrent_requests"] == 0
    assert "slo_attainment" not in summarize(timeline(), 1.0)  # no SLO, no attainment
    with pytest.raises(ValueError):
        summarize(timeline(), 0.0)


def test_custom_percentiles_keys() -> None:
    s = summarize(timeline(), 1.0, percentiles=[50, 99.9])
    assert "p99.9_ttft_ms" in s and "p50_tpot_ms" in s and "p90_ttft_ms" not in s


def test_slo_parse() -> None:
    assert GoodputTargets.parse(["ttft:200 tpot:50"]) == GoodputTargets(ttft_ms=200, tpot_ms=50)
    assert GoodputTargets.parse(["ttft:200", "e2el:1500.5"]) == GoodputTargets(ttft_ms=200, e2el_ms=1500.5)
    assert GoodputTargets.parse(["tpot:40"]).headers() == {"x-slo-tpot-ms": "40"}
    assert GoodputTargets.parse(["ttft:250", "tpot:40"]).headers() == {
        "x-slo-ttft-ms": "250",
        "x-slo-tpot-ms": "40",
    }
    assert not GoodputTargets.parse([])
    for bad in ("ttft=200", "latency:3", "ttft:-1", "ttft:abc", "tpot:inf"):
        with pytest.raises(ValueError, match="bad SLO"):
            GoodputTargets.parse([bad])

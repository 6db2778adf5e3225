"""The multiplexing policies in the simulator: Drift against chunked prefill in the regime of the paper."""

from __future__ import annotations

import dataclasses

import pytest

from drift_agent.bench.metrics import GoodputTargets
from drift_agent.bench.workloads import WorkloadParams, generate
from drift_agent.multiplex import policies
from drift_agent.sim import LoadSpec, SimSetup, simulate_rate

from .helpers import mixed_long_and_chat


def test_drift_beats_chunked_on_goodput_with_long_prefills_and_tight_tpot():
    """Every third request is a long prompt landing on a large decode batch, and the TPOT target is tight
    (20 ms for an 8B model on an H100, about twice a decode step). Chunked prefill (the engine's default
    2048-token budget) stretches every decode step that carries a chunk, so most requests miss TPOT; Drift
    keeps decode on its own SMs and meets both targets."""
    specs = mixed_long_and_chat(200, long_every=3)
    slo = GoodputTargets(ttft_ms=4000, tpot_ms=20)
    load = LoadSpec(slo=slo)
    results = {}
    for policy in ("chunked", "drift"):
        setup = SimSetup.build("llama-3-8b", "h100", policy=policy, slo_ttft_ms=4000, slo_tpot_ms=20)
        results[policy] = simulate_rate(setup, specs, 9.0, load).summary
    chunked, drift = results["chunked"], results["drift"]
    assert drift["request_goodput"] > 1.3 * chunked["request_goodput"]
    assert drift["slo_attainment"] >= 0.95 > 0.8 > chunked["slo_attainment"]
    assert drift["tpot_attainment"] > chunked["tpot_attainment"]
    assert drift["p90_tpot_ms"] < chunked["p90_tpot_ms"]


def test_drift_uses_several_splits_and_static_split_one():
    specs = mixed_long_and_chat(40)
    used = {}
    for policy in ("static-split", "drift"):
        cluster = SimSetup.build("llama-3-8b", "h100", policy=policy).cluster_for_run()
        cluster.run(specs, 4.0)
        used[policy] = cluster.instances[0].splits_used
    mixed = [s for s in used["static-split"] if s[0] and s[1]]
    assert len(mixed) == 1  # one fixed mixed split (plus the whole device when only one phase has work)
    assert len(used["drift"]) >= 2


def test_drift_keeps_throughput_when_sequence_slots_are_the_bottleneck(monkeypatch: pytest.MonkeyPatch):
    """Short prompts, long answers, a loose TPOT (100 ms) and more load than 256 slots turn over: the smallest decode share alone
    (the smallest decode share meeting TPOT) gives decode 20 of 132 SMs, every step crawls, slots free slowly
    and the queue grows. Just enough prefill ( while requests wait for a slot) keeps drift at
    static-split's throughput; without it (prefill_slack_share=0) the collapse shows. Folding (short
    prompts into the decode step) avoids the split altogether, so it is off for the just-enough-prefill comparison."""
    specs = generate("random", 1000, 0, WorkloadParams(input_len=128, output_len=256, range_ratio=0.5))
    load = LoadSpec(slo=GoodputTargets(ttft_ms=1000, tpot_ms=100))

    def run(policy: str, fold: int = 0) -> dict:
        setup = SimSetup.build(
            "llama-3-8b", "h100", policy=policy, slo_ttft_ms=1000, slo_tpot_ms=100, fold_max_tokens=fold
        )
        return simulate_rate(setup, specs, 40.0, load).summary

    static, drift, folding = run("static-split"), run("drift"), run("drift", fold=2048)
    for d in (drift, folding):
        assert d["slo_attainment"] >= 0.95 and d["p90_ttft_ms"] < 1000
        assert d["request_throughput"] >= 0.95 * static["request_throughput"]
    orig = policies.dispatcher_config
    monkeypatch.setattr(
        policies, "dispatcher_config", lambda n, p: dataclasses.replace(orig(n, p), prefill_slack_share=0.0)
    )
    smallest_share = run("drift")
    assert smallest_share["slo_attainment"] < 0.8 and smallest_share["p90_ttft_ms"] > 4 * drift["p90_ttft_ms"]
    assert smallest_share["request_throughput"] < 0.9 * drift["request_throughput"]


def test_folding_short_prompts_keeps_drift_level_with_chunked_on_chat():
    """ShareGPT-like chat near chunked prefill's capacity (52 req/s, TTFT 500 ms, TPOT 15 ms): short prompts
    ride along the decode step (the dispatcher's folding), as chunked prefill runs them, instead of taking SMs from
    decode. Without folding, drift's queue grows and a third of the requests miss their TTFT."""
    specs = generate("sharegpt-like", 2000, seed=0)
    load = LoadSpec(slo=GoodputTargets(ttft_ms=500, tpot_ms=15))

    def run(policy: str, fold: int) -> dict:
        setup = SimSetup.build(
            "llama-3-8b", "h100", policy=policy, slo_ttft_ms=500, slo_tpot_ms=15, fold_max_tokens=fold
        )
        return simulate_rate(setup, specs, 52.0, load).summary

    chunked, folding, splitting = run("chunked", 2048), run("drift", 2048), run("drift", 0)
    assert (
        folding["slo_attainment"] >= 0.95 and folding["request_goodput"] >= 0.95 * chunked["request_goodput"]
    )
    assert splitting["slo_attainment"] < folding["slo_attainment"] - 0.2

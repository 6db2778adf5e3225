"""The multiplexing policies in the simulator: Drift against chunked prefill in the regime of the paper."""

from __future__ import annotations

from drift_agent.bench.metrics import SLO
from drift_agent.sim import LoadSpec, SimSetup, simulate_rate

from .helpers import mixed_long_and_chat


def test_drift_beats_chunked_on_goodput_with_long_prefills_and_tight_tpot():
    """Every third request is a long prompt landing on a large decode batch, and the TPOT target is tight
    (20 ms for an 8B model on an H100, about twice a decode step). Chunked prefill (the engine's default
    2048-token budget) stretches every decode step that carries a chunk, so most requests miss TPOT; Drift
    keeps decode on its own SMs and meets both targets."""
    specs = mixed_long_and_chat(200, long_every=3)
    slo = SLO(ttft_ms=4000, tpot_ms=20)
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

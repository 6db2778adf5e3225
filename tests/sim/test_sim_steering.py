"""Steering drift's TPOT margin in the simulator: a performance model that is wrong about the device
(`model_error`) gives the operator something to correct, and the margin (the dispatcher's TPOT margin) corrects it."""

from __future__ import annotations

import numpy as np
import pytest

from drift_agent.bench.metrics import GoodputTargets
from drift_agent.bench.workloads import RequestSpec, WorkloadParams, generate
from drift_agent.sim import Cluster, InstanceConfig, LoadSpec, SimSetup, simulate_rate
from drift_agent.sim import instance as sim_instance
from drift_agent.sim.executor import ScaledDevice

from .helpers import WHOLE_DEVICE, ConstantModel, mixed_long_and_chat


def _summary(specs: list[RequestSpec], rate: float, slo: GoodputTargets, margin: float, error: float) -> dict:
    setup = SimSetup.build(
        "llama-3-8b",
        "h100",
        policy="drift",
        slo_ttft_ms=slo.ttft_ms,
        slo_tpot_ms=slo.tpot_ms,
        tpot_margin=margin,
        model_error=error,
    )
    return simulate_rate(setup, specs, rate, LoadSpec(slo=slo)).summary


def test_positive_margin_recovers_the_tpot_an_optimistic_model_loses():
    """Long prompts on a chat decode batch with a tight TPOT (16 ms): drift meets both targets when its
    model is exact; on a device 20% slower than the model its decode shares are too small and a fifth of
    the requests miss TPOT. Each step of margin the operator adds gives decode SMs back."""
    specs = mixed_long_and_chat(200, long_every=3)
    slo = GoodputTargets(ttft_ms=4000, tpot_ms=16)
    assert _summary(specs, 7.5, slo, 0.0, 1.0)["slo_attainment"] == 1.0
    runs = [_summary(specs, 7.5, slo, margin, 1.2) for margin in (0.0, 0.1, 0.3)]
    assert runs[0]["tpot_attainment"] < 0.85
    tpot = [r["tpot_attainment"] for r in runs]
    both = [r["slo_attainment"] for r in runs]
    assert tpot == sorted(tpot) and both == sorted(both)
    assert both[-1] >= both[0] + 0.15 and tpot[-1] >= 0.95


def test_negative_margin_recovers_the_ttft_a_pessimistic_model_loses():
    """ShareGPT-like chat near capacity on a device 10% faster than the model: decode is over-provisioned
    and TTFT lags while TPOT holds. A negative margin folds more prompts into the decode step and gives
    prefill more SMs: TTFT, and with it the joint attainment, rise while TPOT still holds."""
    specs = generate("sharegpt-like", 1000, seed=0)
    slo = GoodputTargets(ttft_ms=500, tpot_ms=15)
    untuned, steered = (_summary(specs, 66.0, slo, margin, 0.9) for margin in (0.0, -0.4))
    assert untuned["ttft_attainment"] < 0.95 and untuned["tpot_attainment"] >= 0.99
    assert steered["ttft_attainment"] > untuned["ttft_attainment"] + 0.02
    assert steered["slo_attainment"] > untuned["slo_attainment"] + 0.02
    assert steered["tpot_attainment"] >= 0.99
    assert steered["p90_ttft_ms"] < untuned["p90_ttft_ms"]


@pytest.mark.parametrize("policy", ["chunked", "drift"])
def test_an_exact_device_changes_nothing(policy: str, monkeypatch: pytest.MonkeyPatch):
    """Model error 1 runs on the model itself; wrapping it anyway gives the same floats (the device
    delegates every latency to the model)."""
    specs = mixed_long_and_chat(24)
    setup = SimSetup.build("llama-3-8b", "h100", policy=policy)
    plain = setup.run(specs, 4.0)
    monkeypatch.setattr(sim_instance, "device_model", ScaledDevice)
    assert isinstance(setup.cluster_for_run().instances[0].device, ScaledDevice)
    wrapped = setup.run(specs, 4.0)
    assert [r.to_dict() for r in wrapped.records] == [r.to_dict() for r in plain.records]


def test_model_error_scales_every_latency_on_the_device():
    s = 0.01
    spec = generate("random", 1, 0, WorkloadParams(input_len=32, output_len=4))
    exact, slow = (
        Cluster(ConstantModel(s), WHOLE_DEVICE, InstanceConfig(num_kv_blocks=64, model_error=e))
        .run(spec, 1.0)
        .records[0]
        for e in (1.0, 1.5)
    )
    assert exact.ttft == pytest.approx(s) and slow.ttft == pytest.approx(1.5 * s)
    np.testing.assert_allclose(slow.itl, [1.5 * s] * 3)
    with pytest.raises(ValueError, match="model_error"):
        InstanceConfig(model_error=0.0)
    with pytest.raises(ValueError, match="tpot_margin"):
        InstanceConfig(tpot_margin=1.5)


@pytest.mark.parametrize("policy", ["chunked", "drift"])
def test_fast_forward_stays_exact_on_a_misjudged_device(policy: str):
    """Spans cost their steps on the device too, so fast-forwarding still equals stepping."""
    specs = mixed_long_and_chat(40)
    setup = SimSetup.build("llama-3-8b", "h100", policy=policy, model_error=1.3)
    fast = setup.run(specs, 6.0)
    slow = setup.with_instance(fast_forward=False).run(specs, 6.0)
    assert fast.stats["fast_forwarded_steps"] > 0 == slow.stats["fast_forwarded_steps"]
    for a, b in zip(fast.records, slow.records, strict=True):
        assert a.output_tokens == b.output_tokens
        assert a.ttft == pytest.approx(b.ttft, abs=1e-9) and a.latency == pytest.approx(b.latency, abs=1e-9)
        np.testing.assert_allclose(a.itl, b.itl, atol=1e-9)

"""A measured profile (`drift profile` output) drives the simulator instead of the roofline."""

from __future__ import annotations

import pytest

from drift_agent.bench.workloads import WorkloadParams, generate
from drift_agent.multiplex.fitting import fit_profile
from drift_agent.multiplex.perf_model import FittedPerfModel, PrefillShape
from drift_agent.multiplex.schema import DecodeSample, PrefillSample, save_profile
from drift_agent.sim import SimSetup
from drift_agent.sim.presets import Hardware, device_preset, model_preset


def _profile_from_roofline(path):
    """Samples of the analytic model at a few SM counts, fitted like a real profile."""
    hw = Hardware(model_preset("llama-3-8b"), device_preset("h100"))
    perf = hw.perf_model()
    pre, dec = [], []
    for sms in (40, 88, 132):
        for t in (256, 512, 1024, 2048, 4096, 8192, 12288):
            for p in (0, 2048):
                pre.append(
                    PrefillSample(
                        sms=sms,
                        new_tokens=t,
                        cached_tokens=p,
                        seconds=perf.prefill_time(PrefillShape(t, p), sms),
                    )
                )
        for b in (1, 8, 32, 128):
            for kv in (1024, 16384, 65536, 262144):
                dec.append(
                    DecodeSample(
                        sms=sms,
                        batch_size=b,
                        kv_tokens=max(kv, b),
                        seconds=perf.decode_time(b, max(kv, b), sms),
                    )
                )
    prof = fit_profile(
        pre,
        dec,
        model="llama-3-8b",
        device="NVIDIA H100 80GB HBM3",
        dtype="bfloat16",
        total_sms=132,
        num_layers=32,
    )
    save_profile(path, prof)
    return perf


def test_profile_replaces_the_roofline(tmp_path):
    path = tmp_path / "profile.json"
    roofline = _profile_from_roofline(path)
    setup = SimSetup.build("llama-3-8b", "h100", profile_path=path, policy="chunked")
    assert isinstance(setup.perf, FittedPerfModel) and "profile" in setup.perf_source
    assert setup.splits[0].prefill_sms == 132 and all(s.prefill_sms % 8 == 0 for s in setup.splits[1:-1])
    specs = generate("random", 30, 0, WorkloadParams(input_len=1024, output_len=16))
    fitted = setup.run(specs, 2.0)
    analytic = SimSetup.build("llama-3-8b", "h100", policy="chunked").run(specs, 2.0)
    assert all(r.success for r in fitted.records)
    # The fit reproduces its source closely, so the simulated latencies agree.
    for a, b in zip(fitted.records, analytic.records, strict=True):
        assert a.ttft == pytest.approx(b.ttft, rel=0.15)
        assert a.latency == pytest.approx(b.latency, rel=0.15)
    assert roofline.total_sms == 132
    drift = setup.with_policy("drift").run(specs, 2.0)
    assert all(r.success for r in drift.records)


def test_profile_with_another_layer_count_is_refused(tmp_path):
    path = tmp_path / "profile.json"
    _profile_from_roofline(path)
    with pytest.raises(ValueError, match="layers"):
        SimSetup.build("llama-2-13b", "h100", profile_path=path)

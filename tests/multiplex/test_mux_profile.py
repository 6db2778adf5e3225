from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drift_agent.multiplex.perf_model import FittedPerfModel, PrefillShape
from drift_agent.multiplex.profile import ProfileGrid, format_fit_report, run_profile, sweep
from drift_agent.multiplex.schema import load_profile
from drift_agent.partition import Split, candidate_splits

SPLITS = candidate_splits(132, 8, 8)


class FakeDevice:
    """Latencies from a known formula, ∝ 1/SMs for prefill and mildly for decode, with 1% noise."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.calls: list[tuple[str, int]] = []

    def noise(self) -> float:
        return 1 + 0.01 * self.rng.standard_normal()

    def prefill(self, t: int, p: int, split: Split) -> float:
        self.calls.append(("prefill", split.prefill_sms))
        x, y = t / 1024, p / 1024
        return (0.002 * x * x + 0.001 * x * y + 0.03 * x + 0.004) * 132 / split.prefill_sms * self.noise()

    def decode(self, b: int, k: int, split: Split) -> float:
        self.calls.append(("decode", split.decode_sms))
        return (0.0004 * k / 1024 + 0.00005 * b + 0.008) * (132 / split.decode_sms) ** 0.3 * self.noise()

    def concurrent(self, split: Split, pre: tuple[int, int], dec: tuple[int, int]) -> tuple[float, ...]:
        pa, da = self.prefill(*pre, split), self.decode(*dec, split)
        return pa, pa * 1.1, da, da * 1.25


def test_run_profile_fits_saves_and_plots(tmp_path: Path) -> None:
    dev = FakeDevice()
    out, png = tmp_path / "profile.json", tmp_path / "plots" / "fit.png"
    grid = ProfileGrid(repeats=1, max_context=32768)
    res = run_profile(
        dev.prefill,
        dev.decode,
        splits=SPLITS,
        model="m",
        device="FakeGPU",
        dtype="bfloat16",
        total_sms=132,
        num_layers=4,
        grid=grid,
        measure_concurrent=dev.concurrent,
        out_path=out,
        plot_path=png,
        created_at="2025-01-01T00:00:00Z",
    )
    prof = res.profile
    assert sorted(g.sms for g in prof.prefill) == [72, 80, 88, 96, 104, 112, 132]
    assert sorted(g.sms for g in prof.decode) == [20, 28, 36, 44, 52, 60, 132]
    summary = prof.fit_error()
    assert summary.prefill_mape < 2.5 and summary.decode_mape < 2.5
    assert prof.contention.measured and prof.contention.decode_slowdown == pytest.approx(1.25)
    assert load_profile(out, model="m") == prof
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    model = FittedPerfModel(prof)
    truth = dev.prefill(3000, 1000, Split(100, 32)) / dev.noise()  # an unprofiled SM count
    assert model.prefill_time(PrefillShape(3000, 1000), 100) == pytest.approx(truth, rel=0.08)
    report = format_fit_report(prof)
    assert "prefill   72 SMs" in report and "contention: decode x1.25" in report and "measured" in report


def test_cpu_single_point_and_repeats_use_median(tmp_path: Path) -> None:
    calls = {"n": 0}

    def prefill(t: int, p: int, split: Split) -> float:
        calls["n"] += 1
        return [1e-3, 9.0, 1.1e-3][calls["n"] % 3] * t  # one outlier per three repeats

    def decode(b: int, k: int, split: Split) -> float:
        return 1e-3 + 1e-5 * b + 1e-8 * k

    cpu_splits = [Split(2, 0), Split(0, 2)]
    grid = ProfileGrid(
        prefill_tokens=(16, 64, 256),
        prefill_cached=(0,),
        decode_batch=(1, 4),
        decode_kv_per_seq=(32, 128),
        repeats=3,
        contention_points=(),
    )
    res = run_profile(
        prefill,
        decode,
        splits=cpu_splits,
        model="tiny",
        device="cpu",
        dtype="float32",
        total_sms=2,
        num_layers=2,
        grid=grid,
    )
    assert [g.sms for g in res.profile.prefill] == [2] and [g.sms for g in res.profile.decode] == [2]
    assert all(s.seconds < 1.0 for s in res.profile.prefill_samples)  # the outlier never wins the median
    assert not res.profile.contention.measured and "assumed" in (res.profile.notes or "")
    assert res.json_path is None and res.plot_path is None


def test_sweep_respects_context_and_rejects_bad_measurements() -> None:
    dev = FakeDevice()
    grid = ProfileGrid.quick(max_context=64)
    pre, dec = sweep(dev.prefill, dev.decode, [Split(2, 0), Split(0, 2)], grid)
    assert all(s.new_tokens + s.cached_tokens <= 64 for s in pre)
    assert all(s.kv_tokens // s.batch_size <= 64 for s in dec)
    with pytest.raises(ValueError, match="non-positive"):
        sweep(lambda *a: 0.0, dev.decode, [Split(2, 0), Split(0, 2)], grid)
    with pytest.raises(ValueError, match="SMs for prefill and for decode"):
        sweep(dev.prefill, dev.decode, [Split(2, 0)], grid)
    with pytest.raises(ValueError, match="no prefill or no decode"):
        sweep(dev.prefill, dev.decode, [Split(2, 0), Split(0, 2)], ProfileGrid.quick(max_context=1))

from __future__ import annotations

import math

import numpy as np
import pytest

from drift_agent.multiplex.fitting import (
    ContentionSample,
    fit_contention,
    fit_decode_grid,
    fit_prefill_grid,
    fit_profile,
)
from drift_agent.multiplex.perf_model import (
    FittedPerfModel,
    PrefillShape,
    interpolate_in_sms,
    prefill_regime_time,
)
from drift_agent.multiplex.schema import (
    Contention,
    DecodeGrid,
    DecodeRegime,
    DecodeSample,
    PerfProfile,
    PrefillGrid,
    PrefillRegime,
    PrefillSample,
)

# Ground truth per regime (seconds): a, b, c, d for T ≤ 2K, 2K–8K, > 8K.
TRUE_PREFILL = [(0.002, 0.001, 0.030, 0.004), (0.004, 0.0015, 0.028, 0.006), (0.006, 0.002, 0.020, 0.030)]
TRUE_DECODE = [(0.0004, 0.00005, 0.008), (0.0003, 0.00006, 0.020)]


def true_prefill(t: int, p: int) -> float:
    a, b, c, d = TRUE_PREFILL[0 if t <= 2048 else 1 if t <= 8192 else 2]
    x, y = t / 1024, p / 1024
    return a * x * x + b * x * y + c * x + d


def true_decode(bs: int, k: int) -> float:
    a, b, c = TRUE_DECODE[0 if k <= 131072 else 1]
    return a * k / 1024 + b * bs + c


def prefill_samples(sms: int, noise: float, seed: int = 0, scale: float = 1.0) -> list[PrefillSample]:
    rng = np.random.default_rng(seed)
    out = []
    for t in (128, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 6144, 8192, 10240, 12288, 16384, 24576):
        for p in (0, 1024, 4096, 16384):
            y = true_prefill(t, p) * scale * (1 + noise * rng.standard_normal())
            out.append(PrefillSample(sms=sms, new_tokens=t, cached_tokens=p, seconds=y))
    return out


def decode_samples(sms: int, noise: float, seed: int = 1, scale: float = 1.0) -> list[DecodeSample]:
    rng = np.random.default_rng(seed)
    out = []
    for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for per in (128, 512, 1024, 2048, 4096):
            k = bs * per
            y = true_decode(bs, k) * scale * (1 + noise * rng.standard_normal())
            out.append(DecodeSample(sms=sms, batch_size=bs, kv_tokens=k, seconds=y))
    return out


def test_prefill_fit_recovers_exact_coefficients_without_noise() -> None:
    g = fit_prefill_grid(prefill_samples(132, 0.0))
    assert [r.upper_tokens for r in g.regimes] == [2048, 8192, None]
    for r, truth in zip(g.regimes, TRUE_PREFILL, strict=True):
        assert (r.a, r.b, r.c, r.d) == pytest.approx(truth, rel=1e-5, abs=1e-9)
    assert g.error is not None and g.error.max_abs_pct < 1e-3


def test_prefill_fit_with_noise_is_close_and_reports_small_error() -> None:
    g = fit_prefill_grid(prefill_samples(132, 0.02))
    assert g.regimes[0].c == pytest.approx(TRUE_PREFILL[0][2], rel=0.1)  # short prompts: GEMM term dominates
    assert g.regimes[2].a == pytest.approx(TRUE_PREFILL[2][0], rel=0.1)  # long prompts: attention dominates
    # Held-out shapes (not in the sweep) are predicted within a few percent of the truth.
    for t in (300, 1800, 5000, 7000, 9000, 20000):
        for p in (0, 2000, 10000):
            r = g.regimes[0 if t <= 2048 else 1 if t <= 8192 else 2]
            pred = prefill_regime_time(r, [PrefillShape(t, p)])
            assert pred == pytest.approx(true_prefill(t, p), rel=0.06)
    assert g.error.mape < 3.0 and g.error.max_abs_pct < 10.0


def test_decode_fit_recovers_coefficients_and_regimes() -> None:
    g = fit_decode_grid(decode_samples(20, 0.0))
    assert [r.upper_kv_tokens for r in g.regimes] == [131072, None]
    for r, truth in zip(g.regimes, TRUE_DECODE, strict=True):
        assert (r.a, r.b, r.c) == pytest.approx(truth, rel=1e-5)
        assert r.e == 0.0
    noisy = fit_decode_grid(decode_samples(20, 0.02))
    assert noisy.error.mape < 3.0


def test_decode_quadratic_term() -> None:
    samples = [
        DecodeSample(
            sms=8, batch_size=b, kv_tokens=k, seconds=0.001 * (k / 1024) + 1e-5 * (k / 1024) ** 2 + 0.005
        )
        for b in (1, 4, 16)
        for k in (b * 512, b * 2048, b * 8192)
    ]
    g = fit_decode_grid(samples, bounds=(), quadratic_kv=True)
    assert g.regimes[0].e == pytest.approx(1e-5, rel=1e-3) and g.error.max_abs_pct < 1e-3


def test_sparse_regimes_are_merged() -> None:
    few = [s for s in prefill_samples(66, 0.0) if s.new_tokens <= 4096 or s.new_tokens == 16384][:30]
    g = fit_prefill_grid(few)
    assert len(g.regimes) < 3 and g.regimes[-1].upper_tokens is None


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no prefill samples"):
        fit_prefill_grid([])
    mixed = prefill_samples(66, 0.0)[:3] + prefill_samples(132, 0.0)[:3]
    with pytest.raises(ValueError, match="share an SM count"):
        fit_prefill_grid(mixed)


def _profile() -> PerfProfile:
    # t ∝ 1/s exactly: grid at 66 SMs is twice grid at 132 SMs.
    pre = prefill_samples(132, 0.0) + prefill_samples(66, 0.0, scale=2.0)
    dec = decode_samples(132, 0.0) + decode_samples(33, 0.0, scale=4.0)
    return fit_profile(
        pre,
        dec,
        model="m",
        device="dev",
        dtype="bfloat16",
        total_sms=132,
        num_layers=4,
        contention=Contention(decode_slowdown=1.25, prefill_slowdown=1.1, per_sms_decode={33: 1.4}),
    )


def test_interpolation_between_sm_counts_is_linear_in_inverse_sms() -> None:
    m = FittedPerfModel(_profile())
    base = true_prefill(3000, 1000)
    assert m.prefill_time(PrefillShape(3000, 1000), 132) == pytest.approx(base, rel=1e-4)
    assert m.prefill_time(PrefillShape(3000, 1000), 66) == pytest.approx(2 * base, rel=1e-4)
    assert m.prefill_time(PrefillShape(3000, 1000), 88) == pytest.approx(base * 132 / 88, rel=1e-4)
    # Outside the profiled range: clamp above, compute-bound scaling below.
    assert m.prefill_time(PrefillShape(3000, 1000), 200) == pytest.approx(base, rel=1e-4)
    assert m.decode_time(8, 8192, 11) == pytest.approx(4 * true_decode(8, 8192) * 3, rel=1e-4)
    assert math.isinf(m.prefill_time(PrefillShape(10), 0)) and m.prefill_time([], 66) == 0.0
    assert interpolate_in_sms([10, 20], lambda s: 100.0 / s, 15) == pytest.approx(100 / 15)


def test_monotone_in_sms_and_tokens() -> None:
    m = FittedPerfModel(_profile())
    times = [m.prefill_time(PrefillShape(4096), s) for s in (20, 33, 50, 66, 90, 132)]
    assert times == sorted(times, reverse=True)
    toks = [m.prefill_time(PrefillShape(t, 512), 100) for t in (64, 512, 2048, 2049, 8000, 20000)]
    assert toks == sorted(toks)
    dec = [m.decode_time(b, b * 1024, 60) for b in (1, 4, 16, 64)]
    assert dec == sorted(dec)


def test_batch_prediction_decomposes() -> None:
    m = FittedPerfModel(_profile())
    one = m.prefill_time(PrefillShape(1000, 0), 132)
    two = m.prefill_time([PrefillShape(500, 0), PrefillShape(500, 0)], 132)
    a, _, c, d = TRUE_PREFILL[0]
    # Two 500-token sequences: same GEMM work and fixed cost, half the quadratic attention term.
    assert one - two == pytest.approx(a * (1000 / 1024) ** 2 / 2, rel=1e-3)
    assert two > 0.5 * one


def test_contention_factors() -> None:
    m = FittedPerfModel(_profile())
    assert m.decode_time(4, 4096, 33, contended=True) == pytest.approx(1.4 * m.decode_time(4, 4096, 33))
    assert m.decode_slowdown(36) == 1.4  # nearest measured SM count
    assert m.prefill_time(PrefillShape(100), 100, contended=True) == pytest.approx(
        1.1 * m.prefill_time(PrefillShape(100), 100)
    )
    c = fit_contention(
        [ContentionSample(96, 36, 1.0, 1.1, 0.010, 0.012), ContentionSample(96, 36, 1.0, 1.05, 0.01, 0.013)]
    )
    assert (
        c.measured and c.decode_slowdown == pytest.approx(1.3) and c.per_sms_prefill[96] == pytest.approx(1.1)
    )
    assert fit_contention([]).measured is False
    with pytest.raises(ValueError):
        fit_contention([ContentionSample(96, 36, 0.0, 1.0, 1.0, 1.0)])


def test_layer_blocks_and_fractions() -> None:
    m = FittedPerfModel(_profile())
    shape = PrefillShape(2000)
    total = m.prefill_time(shape, 132)
    blocks = [m.prefill_layers_time(shape, 132, i, 1) for i in range(4)]
    assert sum(blocks) == pytest.approx(total) and blocks[0] == pytest.approx(total / 4)
    prof = _profile().model_copy(update={"layer_fractions": [0.1, 0.2, 0.3, 0.4]})
    mf = FittedPerfModel(prof)
    assert mf.prefill_layers_time(shape, 132, 2, 2) == pytest.approx(0.7 * total)
    assert mf.layers_within(shape, 132, 0, 0.31 * total) == 2
    assert mf.layers_within(shape, 132, 0, 0.0) == 1  # always progress
    assert mf.layers_within(shape, 132, 4, 1.0) == 0


def test_fit_error_summary() -> None:
    prof = fit_profile(
        prefill_samples(132, 0.03, seed=3),
        decode_samples(132, 0.0),
        model="m",
        device="d",
        dtype="f",
        total_sms=132,
        num_layers=2,
    )
    s = prof.fit_error()
    assert 0 < s.prefill_mape < 5 and s.decode_mape < 1e-3 and s.worst_grid == "prefill@132SM"
    assert s.prefill_max_abs_pct >= s.prefill_mape


def test_hand_written_profile_regimes_are_used() -> None:
    prof = PerfProfile(
        model="m",
        device="d",
        dtype="f",
        total_sms=8,
        num_layers=1,
        prefill=[
            PrefillGrid(
                sms=8,
                regimes=[
                    PrefillRegime(upper_tokens=100, a=0, b=0, c=1.0, d=0),
                    PrefillRegime(a=0, b=0, c=2.0, d=0),
                ],
            )
        ],
        decode=[DecodeGrid(sms=8, regimes=[DecodeRegime(a=0, b=0, c=0.5)])],
    )
    m = FittedPerfModel(prof)
    assert m.prefill_time(PrefillShape(100), 8) == pytest.approx(100 / 1024)
    assert m.prefill_time(PrefillShape(101), 8) == pytest.approx(2 * 101 / 1024)
    assert m.decode_time(3, 10, 8) == 0.5

"""Fit a `PerfProfile` from measured latency samples (pure numpy/scipy; no device, no clock).

Each SM count gets its own piecewise fit. The least-squares rows are divided by the measured time, so the fit
minimises *relative* error (latencies span orders of magnitude across a sweep), and the coefficients are
constrained non-negative (scipy NNLS): every term is a cost, and non-negative terms make predictions monotone
in tokens, prefix, batch size and KV length, which the dispatcher relies on. A regime with too few samples for
its coefficients is merged into its neighbour rather than fitted under-determined.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from .perf_model import PrefillShape, decode_regime_time, prefill_regime_time
from .schema import (
    Contention,
    DecodeGrid,
    DecodeRegime,
    DecodeSample,
    FitError,
    PerfProfile,
    PrefillGrid,
    PrefillRegime,
    PrefillSample,
)

DEFAULT_PREFILL_BOUNDS: tuple[int, ...] = (2048, 8192)  # new-token regimes: ≤2K, 2K–8K, >8K (as MuxWise)
DEFAULT_DECODE_BOUNDS: tuple[int, ...] = (131072,)  # total-KV regimes: ≤128K, >128K
_K = 1024.0


def _fit_relative(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = features / y[:, None]
    coef, _ = nnls(a, np.ones_like(y))
    return coef


def _error(pred: np.ndarray, y: np.ndarray) -> FitError:
    if len(y) == 0:
        return FitError(samples=0, mape=0.0, max_abs_pct=0.0)
    pct = 100.0 * np.abs(pred - y) / y
    return FitError(samples=len(y), mape=float(pct.mean()), max_abs_pct=float(pct.max()))


def _regimes(values: Sequence[int], bounds: Sequence[int], min_samples: int) -> list[int | None]:
    """Upper bounds of the regimes to fit, after merging regimes with fewer than `min_samples` samples."""
    uppers: list[int | None] = [*sorted(set(bounds)), None]
    changed = True
    while changed and len(uppers) > 1:
        changed = False
        lo: int | None = None
        for i, up in enumerate(uppers):
            n = sum(1 for v in values if (lo is None or v > lo) and (up is None or v <= up))
            if n < min_samples:
                # Merge into the next regime (drop this upper bound), or the last into the previous one.
                del uppers[i if up is not None else i - 1]
                changed = True
                break
            lo = up
    return uppers


def _in_regime(v: int, lo: int | None, up: int | None) -> bool:
    return (lo is None or v > lo) and (up is None or v <= up)


def fit_prefill_grid(
    samples: Sequence[PrefillSample], bounds: Sequence[int] = DEFAULT_PREFILL_BOUNDS
) -> PrefillGrid:
    """Fit `a·(T/1024)² + b·(T/1024)(P/1024) + c·(T/1024) + d` per token regime, for samples of one SM count."""
    if not samples:
        raise ValueError("no prefill samples to fit")
    sms = {s.sms for s in samples}
    if len(sms) != 1:
        raise ValueError(f"prefill samples of one grid must share an SM count, got {sorted(sms)}")
    uppers = _regimes([s.new_tokens for s in samples], bounds, min_samples=5)
    regimes: list[PrefillRegime] = []
    lo: int | None = None
    for up in uppers:
        sel = [s for s in samples if _in_regime(s.new_tokens, lo, up)] or list(samples)
        t = np.array([s.new_tokens / _K for s in sel])
        p = np.array([s.cached_tokens / _K for s in sel])
        y = np.array([s.seconds for s in sel])
        a, b, c, d = _fit_relative(np.column_stack([t * t, t * p, t, np.ones_like(t)]), y)
        regimes.append(PrefillRegime(upper_tokens=up, a=float(a), b=float(b), c=float(c), d=float(d)))
        lo = up
    grid = PrefillGrid(sms=sms.pop(), regimes=regimes)
    return grid.model_copy(update={"error": prefill_grid_error(grid, samples)})


def fit_decode_grid(
    samples: Sequence[DecodeSample], bounds: Sequence[int] = DEFAULT_DECODE_BOUNDS, quadratic_kv: bool = False
) -> DecodeGrid:
    """Fit `a·(K/1024) + b·B + c (+ e·(K/1024)²)` per KV regime, for samples of one SM count."""
    if not samples:
        raise ValueError("no decode samples to fit")
    sms = {s.sms for s in samples}
    if len(sms) != 1:
        raise ValueError(f"decode samples of one grid must share an SM count, got {sorted(sms)}")
    uppers = _regimes([s.kv_tokens for s in samples], bounds, min_samples=5 if quadratic_kv else 4)
    regimes: list[DecodeRegime] = []
    lo: int | None = None
    for up in uppers:
        sel = [s for s in samples if _in_regime(s.kv_tokens, lo, up)] or list(samples)
        k = np.array([s.kv_tokens / _K for s in sel])
        b = np.array([float(s.batch_size) for s in sel])
        y = np.array([s.seconds for s in sel])
        cols = [k, b, np.ones_like(k)] + ([k * k] if quadratic_kv else [])
        coef = _fit_relative(np.column_stack(cols), y)
        e = float(coef[3]) if quadratic_kv else 0.0
        regimes.append(
            DecodeRegime(upper_kv_tokens=up, a=float(coef[0]), b=float(coef[1]), c=float(coef[2]), e=e)
        )
        lo = up
    grid = DecodeGrid(sms=sms.pop(), regimes=regimes)
    return grid.model_copy(update={"error": decode_grid_error(grid, samples)})


def _regime_for(uppers: Sequence[int | None], v: int) -> int:
    for i, up in enumerate(uppers):
        if up is None or v <= up:
            return i
    return len(uppers) - 1


def prefill_grid_error(grid: PrefillGrid, samples: Sequence[PrefillSample]) -> FitError:
    uppers = [r.upper_tokens for r in grid.regimes]
    pred = np.array(
        [
            prefill_regime_time(
                grid.regimes[_regime_for(uppers, s.new_tokens)], [PrefillShape(s.new_tokens, s.cached_tokens)]
            )
            for s in samples
        ]
    )
    return _error(pred, np.array([s.seconds for s in samples]))


def decode_grid_error(grid: DecodeGrid, samples: Sequence[DecodeSample]) -> FitError:
    uppers = [r.upper_kv_tokens for r in grid.regimes]
    pred = np.array(
        [
            decode_regime_time(grid.regimes[_regime_for(uppers, s.kv_tokens)], s.batch_size, s.kv_tokens)
            for s in samples
        ]
    )
    return _error(pred, np.array([s.seconds for s in samples]))


@dataclass(frozen=True)
class ContentionSample:
    """Both phases timed alone and co-running on one split (same shapes in both runs)."""

    prefill_sms: int
    decode_sms: int
    prefill_alone_s: float
    prefill_shared_s: float
    decode_alone_s: float
    decode_shared_s: float


def fit_contention(samples: Sequence[ContentionSample], default: Contention | None = None) -> Contention:
    """Worst observed slowdown per SM count (a guard, not an average: the dispatcher must not under-predict)."""
    if not samples:
        return default or Contention()
    dec: dict[int, float] = defaultdict(lambda: 1.0)
    pre: dict[int, float] = defaultdict(lambda: 1.0)
    for s in samples:
        if min(s.prefill_alone_s, s.prefill_shared_s, s.decode_alone_s, s.decode_shared_s) <= 0:
            raise ValueError(f"contention sample with a non-positive time: {s}")
        dec[s.decode_sms] = max(dec[s.decode_sms], s.decode_shared_s / s.decode_alone_s)
        pre[s.prefill_sms] = max(pre[s.prefill_sms], s.prefill_shared_s / s.prefill_alone_s)
    return Contention(
        decode_slowdown=max(dec.values()),
        prefill_slowdown=max(pre.values()),
        per_sms_decode=dict(dec),
        per_sms_prefill=dict(pre),
        measured=True,
    )


def _group(samples: Sequence, key: Callable) -> dict[int, list]:
    out: dict[int, list] = defaultdict(list)
    for s in samples:
        out[key(s)].append(s)
    return dict(out)


def fit_profile(
    prefill_samples: Sequence[PrefillSample],
    decode_samples: Sequence[DecodeSample],
    *,
    model: str,
    device: str,
    dtype: str,
    total_sms: int,
    num_layers: int,
    prefill_bounds: Sequence[int] = DEFAULT_PREFILL_BOUNDS,
    decode_bounds: Sequence[int] = DEFAULT_DECODE_BOUNDS,
    decode_quadratic_kv: bool = False,
    contention: Contention | None = None,
    layer_fractions: Sequence[float] | None = None,
    created_at: str | None = None,
    notes: str | None = None,
) -> PerfProfile:
    """One grid per measured SM count and phase; the samples are kept in the profile (re-fit, plots)."""
    pre = _group(prefill_samples, lambda s: s.sms)
    dec = _group(decode_samples, lambda s: s.sms)
    if not pre or not dec:
        raise ValueError("a profile needs both prefill and decode samples")
    return PerfProfile(
        model=model,
        device=device,
        dtype=dtype,
        total_sms=total_sms,
        num_layers=num_layers,
        layer_fractions=list(layer_fractions) if layer_fractions is not None else None,
        prefill=[fit_prefill_grid(pre[s], prefill_bounds) for s in sorted(pre)],
        decode=[fit_decode_grid(dec[s], decode_bounds, decode_quadratic_kv) for s in sorted(dec)],
        contention=contention or Contention(),
        prefill_samples=list(prefill_samples),
        decode_samples=list(decode_samples),
        created_at=created_at,
        notes=notes,
    )

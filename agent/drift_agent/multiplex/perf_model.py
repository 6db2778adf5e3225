"""Contention-aware performance model: predicted prefill and decode latency on a given number of SMs.

Two implementations share the `PerfModel` interface so the dispatcher does not care which one it has:
`FittedPerfModel` (a measured `PerfProfile`, see `fitting.py`) and `AnalyticPerfModel` (a roofline estimate,
see `analytic.py`, used when no profile exists).

Conventions: times are seconds; `sms` is the phase's own SM count (0 means the phase has no SMs: infinite
time); `contended=True` means the other phase co-runs on the rest of the GPU, and multiplies by the measured
(or assumed) slowdown factor, because green contexts split SMs but not memory bandwidth or L2.

A prefill *batch* is a sequence of `PrefillShape`s. The fitted form decomposes physically: the attention terms
(a, b) are per sequence, the GEMM term (c) scales with the batch's total new tokens, the constant (d) is paid
once; the regime is chosen by the total. For one sequence this is exactly the profiled formula.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .schema import Contention, DecodeGrid, DecodeRegime, PerfProfile, PrefillGrid, PrefillRegime

_K = 1024.0


@dataclass(frozen=True)
class PrefillShape:
    """One sequence of a prefill batch: `new_tokens` to compute on top of `cached_tokens` of reused prefix."""

    new_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.new_tokens <= 0 or self.cached_tokens < 0:
            raise ValueError(f"invalid prefill shape {self.new_tokens=} {self.cached_tokens=}")


Shapes = PrefillShape | Sequence[PrefillShape]


def _as_list(shapes: Shapes) -> list[PrefillShape]:
    return [shapes] if isinstance(shapes, PrefillShape) else list(shapes)


def _nearest_factor(table: dict[int, float], sms: int, default: float) -> float:
    if not table:
        return default
    return table[min(table, key=lambda k: (abs(k - sms), -k))]


class PerfModel(ABC):
    """Latency predictor. Subclasses supply the isolated (uncontended) base times."""

    total_sms: int
    num_layers: int
    contention: Contention
    layer_fractions: list[float] | None = None

    # --- subclass hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float: ...

    @abstractmethod
    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float: ...

    def _decode_base_many(self, batch_size: int, kv_tokens: np.ndarray, sms: int) -> np.ndarray:
        """`_decode_base` at each of `kv_tokens`. Models with a closed form override it with array arithmetic
        that must give the same floats as the scalar form."""
        return np.array([self._decode_base(batch_size, int(k), sms) for k in kv_tokens], dtype=float)

    def _prefill_base_with_rows(
        self, chunks: list[PrefillShape], rows: int, row_context: int, sms: int
    ) -> float:
        """`_prefill_base` of `chunks` followed by `rows` one-token shapes on `row_context` tokens each. Models
        with a closed form override it, giving the same float without building a shape per row."""
        return self._prefill_base([*chunks, *([PrefillShape(1, row_context)] * rows)], sms)

    # --- public interface -----------------------------------------------------------------------------
    def decode_slowdown(self, decode_sms: int) -> float:
        c = self.contention
        return _nearest_factor(c.per_sms_decode, decode_sms, c.decode_slowdown)

    def prefill_slowdown(self, prefill_sms: int) -> float:
        c = self.contention
        return _nearest_factor(c.per_sms_prefill, prefill_sms, c.prefill_slowdown)

    def prefill_time(
        self, shapes: Shapes, sms: int, *, contended: bool = False, rows: int = 0, row_context: int = 0
    ) -> float:
        """Whole-prefill latency (all layers plus LM head) of a batch on `sms` SMs. `rows` more one-token
        shapes on `row_context` tokens each may follow `shapes` without being built (a chunked step's decode
        rows)."""
        items = _as_list(shapes)
        if not items and rows <= 0:
            return 0.0
        if sms <= 0:
            return math.inf
        s = min(sms, self.total_sms)
        base = (
            self._prefill_base_with_rows(items, rows, row_context, s)
            if rows > 0
            else self._prefill_base(items, s)
        )
        return max(base, 0.0) * (self.prefill_slowdown(sms) if contended else 1.0)

    def decode_time(self, batch_size: int, kv_tokens: int, sms: int, *, contended: bool = False) -> float:
        """One decode step (one token for each of `batch_size` sequences holding `kv_tokens` in total)."""
        if batch_size <= 0:
            return 0.0
        if sms <= 0:
            return math.inf
        t = max(self._decode_base(batch_size, max(kv_tokens, batch_size), min(sms, self.total_sms)), 0.0)
        return t * (self.decode_slowdown(sms) if contended else 1.0)

    def mixed_step_time(self, chunks: list[PrefillShape], rows: int, kv_tokens: int, sms: int) -> float:
        """One forward pass of prefill `chunks` and `rows` decode rows holding `kv_tokens` in total, on `sms`
        SMs with nothing co-running: a chunked-prefill step, or a decode step with short prompts folded in.
        The rows join the prefill batch as one-token shapes at their mean context: the weights are read once
        and each row's attention over its context is counted, which is what a mixed batch does on a GPU."""
        if not chunks:
            return self.decode_time(rows, kv_tokens, sms)
        if not rows:
            return self.prefill_time(chunks, sms)
        return self.prefill_time(chunks, sms, rows=rows, row_context=max(kv_tokens // rows - 1, 0))

    def decode_times(
        self, batch_size: int, kv_tokens: np.ndarray, sms: int, *, contended: bool = False
    ) -> np.ndarray:
        """`decode_time` at each of `kv_tokens` (an integer array), equal to it value by value: the simulator
        costs a run of decode steps, whose contexts grow by `batch_size` a step, in one call."""
        if batch_size <= 0:
            return np.zeros(len(kv_tokens))
        if sms <= 0:
            return np.full(len(kv_tokens), math.inf)
        kv = np.maximum(kv_tokens, batch_size)
        t = np.maximum(self._decode_base_many(batch_size, kv, min(sms, self.total_sms)), 0.0)
        return t * (self.decode_slowdown(sms) if contended else 1.0)

    def layer_share(self, start_layer: int, num_layers: int) -> float:
        """Fraction of the prefill cost in layers [start_layer, start_layer + num_layers)."""
        start = max(0, min(start_layer, self.num_layers))
        stop = max(start, min(start_layer + num_layers, self.num_layers))
        if self.layer_fractions is None:
            return (stop - start) / self.num_layers
        return float(sum(self.layer_fractions[start:stop]))

    def prefill_layers_time(
        self, shapes: Shapes, sms: int, start_layer: int, num_layers: int, *, contended: bool = False
    ) -> float:
        """Latency of a block of layers of a prefill (prefill is launched layer block by layer block)."""
        return self.prefill_time(shapes, sms, contended=contended) * self.layer_share(start_layer, num_layers)

    def layers_within(
        self, shapes: Shapes, sms: int, start_layer: int, budget_s: float, *, contended: bool = False
    ) -> int:
        """Most layers from `start_layer` whose predicted time fits `budget_s`; at least 1 (progress)."""
        if start_layer >= self.num_layers:
            return 0
        return self._layers_fitting(
            self.prefill_time(shapes, sms, contended=contended), start_layer, budget_s
        )

    def layer_block(
        self, shapes: Shapes, sms: int, start_layer: int, budget_s: float, *, contended: bool = False
    ) -> tuple[int, float, float]:
        """The next layer block of a prefill from `start_layer`: (layers within `budget_s`, all remaining when it
        is infinite; that block's latency; the latency of every remaining layer), from one `prefill_time`."""
        remaining = self.num_layers - start_layer
        total = self.prefill_time(shapes, sms, contended=contended)
        layers = remaining if math.isinf(budget_s) else self._layers_fitting(total, start_layer, budget_s)
        return (
            layers,
            total * self.layer_share(start_layer, layers),
            total * self.layer_share(start_layer, remaining),
        )

    def _layers_fitting(self, total: float, start_layer: int, budget_s: float) -> int:
        """`layers_within` for a prefill whose every layer together takes `total`."""
        remaining = self.num_layers - start_layer
        if remaining <= 0:
            return 0
        if not math.isfinite(total) or total <= 0:
            return 1 if not math.isfinite(total) else remaining
        limit = budget_s * (1 + 1e-9)  # tolerate float rounding at the boundary
        # Equal layers: every layer's step is `total * layer_share(i, 1)`, i.e. this one value.
        uniform = total * (1 / self.num_layers) if self.layer_fractions is None else None
        n = 0
        spent = 0.0
        while n < remaining:
            step = total * self.layer_share(start_layer + n, 1) if uniform is None else uniform
            if spent + step > limit:
                break
            spent += step
            n += 1
        return max(1, n)


# --- fitted model ------------------------------------------------------------------------------------


def prefill_regime_time(r: PrefillRegime, shapes: Sequence[PrefillShape]) -> float:
    sq = sum((s.new_tokens / _K) ** 2 for s in shapes)
    cross = sum((s.new_tokens / _K) * (s.cached_tokens / _K) for s in shapes)
    lin = sum(s.new_tokens for s in shapes) / _K
    return r.a * sq + r.b * cross + r.c * lin + r.d


def decode_regime_time(r: DecodeRegime, batch_size: int, kv_tokens: int) -> float:
    k = kv_tokens / _K
    return r.a * k + r.b * batch_size + r.c + r.e * k * k


_PrefillTable = list[
    tuple[float, float, float, float, float]
]  # (upper, a, b, c, d), upper=inf when unbounded
_DecodeTable = list[tuple[float, float, float, float, float]]  # (upper, a, b, c, e)


def _prefill_table(grid: PrefillGrid) -> _PrefillTable:
    inf = math.inf
    return [(r.upper_tokens or inf, r.a, r.b, r.c, r.d) for r in grid.regimes]


def _decode_table(grid: DecodeGrid) -> _DecodeTable:
    return [(r.upper_kv_tokens or math.inf, r.a, r.b, r.c, r.e) for r in grid.regimes]


def _pick(
    table: list[tuple[float, float, float, float, float]], x: int
) -> tuple[float, float, float, float, float]:
    for row in table:
        if x <= row[0]:
            return row
    return table[-1]


def interpolate_in_sms(profiled: Sequence[int], at: Callable[[int], float], sms: int) -> float:
    """Value at `sms` from values at the (sorted) profiled SM counts.

    Between two profiled counts: linear in 1/s (time ∝ work/SMs for the compute-bound part, and exact for a
    fixed cost). Above the largest: the largest's value (more SMs are never assumed to slow a phase down).
    Below the smallest: scaled by s_min/s (pessimistic: fully compute-bound).
    """
    i = bisect.bisect_left(profiled, sms)
    if i < len(profiled) and profiled[i] == sms:
        return at(sms)
    if i == len(profiled):
        return at(profiled[-1])
    if i == 0:
        return at(profiled[0]) * profiled[0] / sms
    lo, hi = profiled[i - 1], profiled[i]
    t_lo, t_hi = at(lo), at(hi)
    w = (1.0 / sms - 1.0 / hi) / (1.0 / lo - 1.0 / hi)
    return t_hi + w * (t_lo - t_hi)


class FittedPerfModel(PerfModel):
    """Predictions from a measured profile: per-SM-count piecewise fits, interpolated between SM counts."""

    def __init__(self, profile: PerfProfile) -> None:
        self.profile = profile
        self.total_sms = profile.total_sms
        self.num_layers = profile.num_layers
        self.layer_fractions = profile.layer_fractions
        self.contention = profile.contention
        # Plain tuples: the dispatcher evaluates the model many times per decision.
        self._prefill = {g.sms: _prefill_table(g) for g in profile.prefill}
        self._decode = {g.sms: _decode_table(g) for g in profile.decode}
        self._prefill_sms = sorted(self._prefill)
        self._decode_sms = sorted(self._decode)

    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float:
        total = sum(s.new_tokens for s in shapes)
        sq = sum((s.new_tokens / _K) ** 2 for s in shapes)
        cross = sum((s.new_tokens / _K) * (s.cached_tokens / _K) for s in shapes)
        lin = total / _K

        def at(s: int) -> float:
            _, a, b, c, d = _pick(self._prefill[s], total)
            return max(a * sq + b * cross + c * lin + d, 0.0)

        return interpolate_in_sms(self._prefill_sms, at, sms)

    def mixed_step_time(self, chunks: list[PrefillShape], rows: int, kv_tokens: int, sms: int) -> float:
        """A fitted prefill form was not measured on one-token rows, so a mixed step costs no less than its
        measured decode step, nor than its prefill alone."""
        mixed = super().mixed_step_time(chunks, rows, kv_tokens, sms)
        if chunks and rows:
            mixed = max(mixed, self.decode_time(rows, kv_tokens, sms), self.prefill_time(chunks, sms))
        return mixed

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        k = kv_tokens / _K

        def at(s: int) -> float:
            _, a, b, c, e = _pick(self._decode[s], kv_tokens)
            return max(a * k + b * batch_size + c + e * k * k, 0.0)

        return interpolate_in_sms(self._decode_sms, at, sms)

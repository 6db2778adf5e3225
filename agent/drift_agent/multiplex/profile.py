"""`drift profile`, minus the engine: sweep a grid through measuring callables, fit, report, save, plot.

The engine-specific runner supplies the callables; each returns the measured latency in seconds of one
forward pass on the given split (prefill on `split.prefill_sms` SMs while decode idles, decode on
`split.decode_sms`), and an optional co-running callable measures contention. On GPU the grid covers every
SM count of the partitioner's splits; on CPU the splits are nominal, so the grid is a single SM count.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..partition.base import Split
from .fitting import (
    DEFAULT_DECODE_BOUNDS,
    DEFAULT_PREFILL_BOUNDS,
    ContentionSample,
    fit_contention,
    fit_profile,
)
from .perf_model import FittedPerfModel, PrefillShape
from .schema import Contention, DecodeSample, PerfProfile, PrefillSample, save_profile

MeasurePrefill = Callable[[int, int, Split], float]  # (new tokens, cached tokens, split) -> seconds
MeasureDecode = Callable[[int, int, Split], float]  # (batch size, total KV tokens, split) -> seconds
# (split, (new, cached) prefill, (batch, kv) decode) -> (prefill alone, prefill shared, decode alone, decode shared)
MeasureConcurrent = Callable[[Split, tuple[int, int], tuple[int, int]], tuple[float, float, float, float]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileGrid:
    prefill_tokens: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
    prefill_cached: Sequence[int] = (0, 2048, 8192)
    decode_batch: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128)
    decode_kv_per_seq: Sequence[int] = (128, 512, 2048, 8192)
    max_context: int | None = None  # skip shapes whose sequence would exceed the context window
    max_decode_batch: int | None = None
    repeats: int = 3  # the median of repeats is recorded
    contention_points: Sequence[tuple[tuple[int, int], tuple[int, int]]] = field(
        default=(((2048, 0), (16, 16 * 1024)), ((512, 0), (64, 64 * 1024)))
    )

    @classmethod
    def quick(cls, max_context: int | None = None) -> ProfileGrid:
        """A small sweep for CPU or smoke tests."""
        return cls(
            prefill_tokens=(16, 32, 64, 128, 256),
            prefill_cached=(0, 64),
            decode_batch=(1, 2, 4, 8),
            decode_kv_per_seq=(32, 128),
            max_context=max_context,
            repeats=1,
            contention_points=(),
        )


@dataclass(frozen=True)
class ProfileResult:
    profile: PerfProfile
    json_path: Path | None
    plot_path: Path | None


def _median(fn: Callable[[int, int, Split], float], args: tuple[int, int, Split], repeats: int) -> float:
    values = [fn(*args) for _ in range(max(1, repeats))]
    bad = [v for v in values if not v > 0]
    if bad:
        raise ValueError(f"a measurement returned a non-positive time ({bad[0]})")
    return statistics.median(values)


def _prefill_split(splits: Sequence[Split], sms: int) -> Split:
    # Prefer the split with the most decode SMs for this prefill size (decode stays idle while measuring).
    return max((s for s in splits if s.prefill_sms == sms), key=lambda s: s.decode_sms)


def _decode_split(splits: Sequence[Split], sms: int) -> Split:
    return max((s for s in splits if s.decode_sms == sms), key=lambda s: s.prefill_sms)


def sweep(
    measure_prefill: MeasurePrefill,
    measure_decode: MeasureDecode,
    splits: Sequence[Split],
    grid: ProfileGrid,
    progress: Progress | None = None,
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Measure every grid point on every distinct prefill and decode SM count of `splits`."""
    say = progress or (lambda _msg: None)
    prefill_sms = sorted({s.prefill_sms for s in splits if s.prefill_sms > 0})
    decode_sms = sorted({s.decode_sms for s in splits if s.decode_sms > 0})
    if not prefill_sms or not decode_sms:
        raise ValueError("splits must include SMs for prefill and for decode")
    pre: list[PrefillSample] = []
    for sms in prefill_sms:
        split = _prefill_split(splits, sms)
        say(f"prefill on {sms} SMs ({split.label})")
        for t in grid.prefill_tokens:
            for p in grid.prefill_cached:
                if grid.max_context is not None and t + p > grid.max_context:
                    continue
                sec = _median(measure_prefill, (t, p, split), grid.repeats)
                pre.append(PrefillSample(sms=sms, new_tokens=t, cached_tokens=p, seconds=sec))
    dec: list[DecodeSample] = []
    for sms in decode_sms:
        split = _decode_split(splits, sms)
        say(f"decode on {sms} SMs ({split.label})")
        for b in grid.decode_batch:
            if grid.max_decode_batch is not None and b > grid.max_decode_batch:
                continue
            for per_seq in grid.decode_kv_per_seq:
                if grid.max_context is not None and per_seq > grid.max_context:
                    continue
                k = b * per_seq
                sec = _median(measure_decode, (b, k, split), grid.repeats)
                dec.append(DecodeSample(sms=sms, batch_size=b, kv_tokens=k, seconds=sec))
    if not pre or not dec:
        raise ValueError("the grid produced no prefill or no decode point (check max_context)")
    return pre, dec


def measure_contention(
    measure_concurrent: MeasureConcurrent,
    splits: Sequence[Split],
    grid: ProfileGrid,
    progress: Progress | None = None,
) -> list[ContentionSample]:
    say = progress or (lambda _msg: None)
    out: list[ContentionSample] = []
    for split in (s for s in splits if s.is_mixed):
        say(f"contention on {split.label}")
        for (t, p), (b, k) in grid.contention_points:
            if grid.max_context is not None and (t + p > grid.max_context or k // b > grid.max_context):
                continue
            pa, ps, da, ds = measure_concurrent(split, (t, p), (b, k))
            out.append(ContentionSample(split.prefill_sms, split.decode_sms, pa, ps, da, ds))
    return out


def run_profile(
    measure_prefill: MeasurePrefill,
    measure_decode: MeasureDecode,
    *,
    splits: Sequence[Split],
    model: str,
    device: str,
    dtype: str,
    total_sms: int,
    num_layers: int,
    grid: ProfileGrid | None = None,
    measure_concurrent: MeasureConcurrent | None = None,
    layer_fractions: Sequence[float] | None = None,
    out_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    created_at: str | None = None,
    progress: Progress | None = None,
    prefill_bounds: Sequence[int] = DEFAULT_PREFILL_BOUNDS,
    decode_bounds: Sequence[int] = DEFAULT_DECODE_BOUNDS,
    decode_quadratic_kv: bool = False,
    label: str | None = None,
) -> ProfileResult:
    """Sweep, fit, optionally measure contention, save the JSON (merged by key) and the plot.

    `model` is the profile's key: the model's identity (`model_select.model_identity`), which the engine looks
    up, so the profile applies whatever name the model is later served under; `label` (e.g. the model
    directory) goes into the profile's notes for people reading the file."""
    grid = grid or ProfileGrid()
    pre, dec = sweep(measure_prefill, measure_decode, splits, grid, progress)
    contention: Contention | None = None
    if measure_concurrent is not None and grid.contention_points:
        contention = fit_contention(measure_contention(measure_concurrent, splits, grid, progress))
    profile = fit_profile(
        pre,
        dec,
        model=model,
        device=device,
        dtype=dtype,
        total_sms=total_sms,
        num_layers=num_layers,
        prefill_bounds=prefill_bounds,
        decode_bounds=decode_bounds,
        decode_quadratic_kv=decode_quadratic_kv,
        contention=contention,
        layer_fractions=layer_fractions,
        created_at=created_at,
        notes="; ".join(
            n
            for n in (
                f"measured on {label}" if label else None,
                None if contention else "contention factors are assumed defaults, not measured",
            )
            if n
        )
        or None,
    )
    json_path = Path(out_path) if out_path is not None else None
    if json_path is not None:
        save_profile(json_path, profile)
    png = Path(plot_path) if plot_path is not None else None
    if png is not None:
        plot_profile(profile, png)
    return ProfileResult(profile, json_path, png)


def format_fit_report(profile: PerfProfile) -> str:
    """Plain-text table of the per-grid fit errors (for the CLI)."""
    lines = [f"{profile.model} on {profile.device} ({profile.dtype}); fit error per SM count:"]
    for name, grids in (("prefill", profile.prefill), ("decode", profile.decode)):
        for g in grids:
            e = g.error
            if e is not None:
                lines.append(
                    f"  {name:7s} {g.sms:4d} SMs  n={e.samples:4d}  MAPE {e.mape:6.2f}%  max {e.max_abs_pct:6.2f}%"
                )
    s = profile.fit_error()
    lines.append(
        f"  summary: prefill MAPE {s.prefill_mape:.2f}% (max {s.prefill_max_abs_pct:.2f}%), "
        f"decode MAPE {s.decode_mape:.2f}% (max {s.decode_max_abs_pct:.2f}%), worst {s.worst_grid or '-'}"
    )
    c = profile.contention
    lines.append(
        f"  contention: decode x{c.decode_slowdown:.2f}, prefill x{c.prefill_slowdown:.2f} "
        f"({'measured' if c.measured else 'assumed'})"
    )
    return "\n".join(lines)


def plot_profile(profile: PerfProfile, path: str | Path) -> Path:
    """Measured vs predicted latency (log-log, one colour per SM count, y = x reference), PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    model = FittedPerfModel(profile)
    fig = Figure(figsize=(11, 5), constrained_layout=True)
    axes = fig.subplots(1, 2)
    panels = (
        (
            "prefill",
            [
                (s.sms, s.seconds, model.prefill_time(PrefillShape(s.new_tokens, s.cached_tokens), s.sms))
                for s in profile.prefill_samples
            ],
        ),
        (
            "decode",
            [
                (s.sms, s.seconds, model.decode_time(s.batch_size, s.kv_tokens, s.sms))
                for s in profile.decode_samples
            ],
        ),
    )
    for ax, (name, points) in zip(axes, panels, strict=True):
        for sms in sorted({p[0] for p in points}):
            xs = [p[1] * 1e3 for p in points if p[0] == sms]
            ys = [p[2] * 1e3 for p in points if p[0] == sms]
            ax.scatter(xs, ys, s=12, label=f"{sms} SMs")
        if points:
            lo = min(min(p[1], p[2]) for p in points) * 1e3
            hi = max(max(p[1], p[2]) for p in points) * 1e3
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(f"{name}: {profile.model} / {profile.device}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out

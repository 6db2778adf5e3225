"""PNG of SLO attainment and latency percentiles against request rate, one line per result file.

Panels: SLO attainment (with the target line), TTFT, TPOT and E2E latency, each latency at P90 (solid) and P99
(dashed). Each result document is one colour, so runs of different policies or engines overlay. Runs at an
infinite rate have no place on a rate axis and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import BenchError
from .results import decode_rate

LATENCY_PANELS: tuple[tuple[str, str], ...] = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))


def _series(doc: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for run in doc["runs"]:
        rate, value = decode_rate(run["request_rate"]), run["summary"].get(key)
        if math.isfinite(rate) and value is not None:
            xs.append(rate)
            ys.append(float(value))
    return xs, ys


def plot_results(docs: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Write the figure for one or more result documents (see `results.py`) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(math.isfinite(decode_rate(run["request_rate"])) for d in docs for run in d["runs"]):
        raise BenchError("nothing to plot: no run at a finite request rate")
    fig, grid = plt.subplots(2, 2, figsize=(11, 8.5))
    axes = list(grid.flat)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    targets = set()
    for i, doc in enumerate(docs):
        color, label = colors[i % len(colors)], str(doc.get("label", f"run {i}"))
        xs, ys = _series(doc, "slo_attainment")
        if xs:
            axes[0].plot(xs, [100 * y for y in ys], "o-", color=color, label=label)
        if doc.get("sweep"):
            targets.add(doc["sweep"]["target_attainment"])
        for ax, (key, _) in zip(axes[1:], LATENCY_PANELS, strict=True):
            for pct, style in (("p90", "o-"), ("p99", "s--")):
                xs, ys = _series(doc, f"{pct}_{key}_ms")
                if xs:
                    ax.plot(xs, ys, style, color=color, label=f"{label} {pct.upper()}")
    for target in targets or {0.9}:
        axes[0].axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    axes[0].set(title="SLO attainment", xlabel="request rate (req/s)", ylabel="requests meeting all SLOs (%)")
    axes[0].set_ylim(-2, 102)
    for ax, (_, name) in zip(axes[1:], LATENCY_PANELS, strict=True):
        ax.set(title=f"{name} (P90 solid, P99 dashed)", xlabel="request rate (req/s)", ylabel="ms")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

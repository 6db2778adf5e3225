"""The result document shared by `drift bench serve`, `drift sim` and the plotter.

{"schema": "drift.bench.serve/v1", "label": "...", "created": ISO-8601, "config": {...},
 "runs": [{"request_rate": 2.0 | "inf", "summary": {...metrics.summarize...}, "requests": [...]?}, ...],
 "sweep": {...SweepResult.to_dict...} | null, "machine": {...machine.MachineLoad.to_dict...}?}
Runs are sorted by rate. JSON has no infinity: an infinite number anywhere (a rate, `--burstiness inf`,
`--mean-turns inf`) is written as the string "inf" (NaN as null), and `load_result` turns the config's and
the runs' "inf" strings back into floats.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import BenchError

SCHEMA = "drift.bench.serve/v1"


def encode_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def decode_rate(value: Any) -> float:
    return float(value)  # float("inf") parses the string form


def make_run(
    rate: float, summary: dict[str, Any], requests: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    run: dict[str, Any] = {"request_rate": encode_rate(rate), "summary": summary}
    if requests is not None:
        run["requests"] = requests
    return run


def make_result(
    label: str, config: dict[str, Any], runs: list[dict[str, Any]], sweep: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "label": label,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "runs": sorted(runs, key=lambda r: decode_rate(r["request_rate"])),
        "sweep": sweep,
    }


_INFINITIES = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by a JSON-valid stand-in: "inf", "-inf", null for NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _decode_infinities(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: _INFINITIES.get(v, v) if isinstance(v, str) else v for k, v in mapping.items()}


def save_result(result: dict[str, Any], path: str | Path) -> None:
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def load_result(path: str | Path) -> dict[str, Any]:
    """A result document, checked enough that plotting it cannot fail halfway."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read result file {p}: {e}") from e
    except json.JSONDecodeError as e:
        raise BenchError(f"{p}: not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise BenchError(f"{p}: not a drift bench result (no 'runs' list)")
    for i, run in enumerate(doc["runs"]):
        if not (isinstance(run, dict) and isinstance(run.get("summary"), dict) and "request_rate" in run):
            raise BenchError(f"{p}: run {i} lacks request_rate or summary")
        try:
            decode_rate(run["request_rate"])
        except (TypeError, ValueError):
            raise BenchError(f"{p}: run {i} has a bad request_rate {run['request_rate']!r}") from None
        run["summary"] = _decode_infinities(run["summary"])
    if isinstance(doc.get("config"), dict):
        doc["config"] = _decode_infinities(doc["config"])
    doc.setdefault("label", p.stem)
    return doc

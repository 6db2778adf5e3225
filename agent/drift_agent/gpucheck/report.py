"""The check's report: parts with a status, data and figures; written atomically as JSON and Markdown."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

# ok: ran to the end; skipped: could not run here (reason); failed: raised (error); truncated: stopped itself
# at its budget with partial results; timeout: stopped by the watchdog past its budget (partial results kept).
Status = Literal["pending", "running", "ok", "skipped", "failed", "truncated", "timeout"]
SCHEMA = "drift-gpu-check/1"


@dataclass
class Figure:
    """One number the report claims, with what was measured and what it is compared against (same run)."""

    name: str
    value: float | None
    unit: str
    workload: str
    baseline: str

    def text(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.4g}"
        return f"{v} {self.unit}".strip()


@dataclass
class PartResult:
    key: str
    title: str
    budget_s: float
    status: Status = "pending"
    reason: str | None = None  # why skipped / truncated / timed out
    error: str | None = None  # failed: the exception and the end of its traceback
    elapsed_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    meta: dict[str, Any]
    parts: list[PartResult]

    def part(self, key: str) -> PartResult:
        return next(p for p in self.parts if p.key == key)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": self.meta, "parts": [asdict(p) for p in self.parts]}

    def to_markdown(self) -> str:
        m = self.meta
        lines = [
            "# Drift GPU check",
            "",
            f"- started: {m.get('started_at')}; mode: {'dry run (CPU, tiny model)' if m.get('dry_run') else 'GPU'}",
            f"- device: {m.get('device', '?')}; total budget {m.get('budget_s')} s; elapsed {m.get('elapsed_s')} s",
            "",
            "| part | status | elapsed s / budget s | note |",
            "| --- | --- | --- | --- |",
        ]
        for p in self.parts:
            note = (p.error or p.reason or "").splitlines()[0][:160] if (p.error or p.reason) else ""
            el = "-" if p.elapsed_s is None else f"{p.elapsed_s:.1f}"
            lines.append(f"| {p.key}. {p.title} | {p.status} | {el} / {p.budget_s:.0f} | {_cell(note)} |")
        for p in self.parts:
            lines += ["", f"## {p.key}. {p.title}: {p.status}"]
            if p.reason:
                lines.append(f"\n{p.reason}")
            if p.error:
                lines += ["", "```", p.error.strip()[-3000:], "```"]
            if p.figures:
                lines += [
                    "",
                    "| figure | value | workload | baseline (same run) |",
                    "| --- | --- | --- | --- |",
                ]
                lines += [
                    f"| {_cell(f.name)} | {f.text()} | {_cell(f.workload)} | {_cell(f.baseline)} |"
                    for f in p.figures
                ]
            for name, table in p.data.get("tables", {}).items():
                lines += ["", f"{name}:", "", *_table(table)]
        return "\n".join(lines) + "\n"

    def write(self, outdir: Path) -> None:
        """Both files, each replaced atomically: a reader (or a kill) never sees half a report."""
        outdir.mkdir(parents=True, exist_ok=True)
        _atomic(outdir / "report.json", json.dumps(self.to_json(), indent=1, default=str) + "\n")
        _atomic(outdir / "report.md", self.to_markdown())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(_fmt(r.get(c))) for c in cols) + " |")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

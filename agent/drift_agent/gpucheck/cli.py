"""`python -m drift_agent.gpucheck OUTDIR [--dry-run] [--budget-s 540] [--parts a,b,...]`.

Exit codes: 0 every part ran (ok, skipped or truncated); 1 a part failed or timed out; 2 a package the check
imports is missing (one line names them; nothing else runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# What the check imports, as (module, distribution to carry). The device image has all but pydantic and its
# dependencies (see scripts/gpu_wheels.sh); fastapi, uvicorn, gguf and kopf are deliberately not imported.
REQUIRED: tuple[tuple[str, str], ...] = (
    ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"),
    ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"),
    ("typing_extensions", "typing-extensions"),
    ("yaml", "pyyaml"),
    ("sortedcontainers", "sortedcontainers"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("tqdm", "tqdm"),
    ("pytest", "pytest"),
)


def missing_packages() -> list[str]:
    """Distributions whose module cannot be found (found, not imported: torch takes seconds to import)."""
    return [dist for mod, dist in REQUIRED if importlib.util.find_spec(mod) is None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument(
        "outdir", type=Path, help="report.json, report.md, profile.json and the pytest log go here"
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny random model, tiny grids (CI)")
    # 9 minutes in all: the parts' budget, plus a watchdog grace, the start and the last write.
    ap.add_argument(
        "--budget-s", type=float, default=520.0, help="the parts' total budget (default: %(default)s)"
    )
    ap.add_argument("--parts", default="abcdef", help="which parts to run, e.g. 'ad' to rerun a and d")
    args = ap.parse_args(argv)

    missing = missing_packages()
    if missing:
        print(
            f"gpu_check: missing Python packages: {', '.join(missing)} (carry wheels: scripts/gpu_wheels.sh)"
        )
        return 2
    from .parts import PARTS_GPU
    from .report import PartResult, Report
    from .runner import run_parts

    parts = [p for p in PARTS_GPU if p.key in args.parts]
    if args.dry_run:  # the same parts at CPU sizes; the budgets only guard against a hang
        parts = [type(p)(p.key, p.title, p.fn, min(p.budget_s, 60.0)) for p in parts]
    report = Report(
        meta={
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dry_run": args.dry_run,
            "budget_s": args.budget_s,
            "argv": sys.argv[1:] if argv is None else argv,
            "note": "every figure names its workload and its baseline, both measured in this run",
        },
        parts=[PartResult(p.key, p.title, p.budget_s) for p in parts],
    )
    t0 = time.monotonic()
    run_parts(parts, report, args.outdir, total_budget_s=args.budget_s, dry_run=args.dry_run)
    env = report.part("a").data if any(p.key == "a" for p in report.parts) else {}
    report.meta["device"] = (env.get("gpu") or {}).get("name") or "cpu"
    report.meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    report.write(args.outdir)
    print(f"gpu_check: report in {args.outdir}/report.md")
    for p in report.parts:
        print(
            f"  {p.key}. {p.title}: {p.status}"
            + (f" ({(p.reason or p.error or '').splitlines()[0][:150]})" if p.reason or p.error else "")
        )
    return 1 if any(p.status in ("failed", "timeout") for p in report.parts) else 0

"""The check's budget and flush logic, with stand-in parts: an overrun is stopped and reported, a failure does
not stop the next part, and the report on disk is valid JSON after every part."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from drift_agent.gpucheck import cli
from drift_agent.gpucheck.report import PartResult, Report
from drift_agent.gpucheck.runner import PartContext, PartSpec, Skip, run_parts


def _report(parts: list[PartSpec]) -> Report:
    return Report(meta={"dry_run": True}, parts=[PartResult(p.key, p.title, p.budget_s) for p in parts])


def _read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_each_outcome_is_recorded_and_later_parts_still_run(tmp_path: Path) -> None:
    seen: list[dict] = []

    def ok(ctx: PartContext) -> None:
        seen.append(_read(ctx.outdir))  # what a kill now would leave behind
        ctx.data["x"] = 1
        ctx.figure("f", 2.0, "x", "some workload", "some baseline")

    def boom(ctx: PartContext) -> None:
        seen.append(_read(ctx.outdir))
        raise ValueError("broken part")

    def skip(_ctx: PartContext) -> None:
        raise Skip("no GPU")

    def hang(ctx: PartContext) -> None:
        ctx.data["partial"] = "kept"
        while True:  # ignores its budget: the watchdog must stop it
            time.sleep(0.01)

    def polite(ctx: PartContext) -> None:
        done = 0
        while ctx.time_left() > 0:
            done += 1
            time.sleep(0.01)
        ctx.data["done"] = done
        ctx.truncate("out of budget")

    parts = [
        PartSpec("a", "ok", ok, 30),
        PartSpec("b", "fails", boom, 30),
        PartSpec("c", "skips", skip, 30),
        PartSpec("d", "hangs", hang, 0.2),
        PartSpec("e", "truncates", polite, 0.2),
        PartSpec("f", "after", ok, 30),
    ]
    report = run_parts(parts, _report(parts), tmp_path, total_budget_s=60, grace_s=0.3, log=lambda _m: None)
    status = {p.key: p.status for p in report.parts}
    assert status == {"a": "ok", "b": "failed", "c": "skipped", "d": "timeout", "e": "truncated", "f": "ok"}
    on_disk = {p["key"]: p for p in _read(tmp_path)["parts"]}
    assert "ValueError: broken part" in on_disk["b"]["error"]
    assert on_disk["c"]["reason"] == "no GPU"
    assert on_disk["d"]["data"] == {"partial": "kept"} and "watchdog" in on_disk["d"]["reason"]
    assert on_disk["e"]["reason"] == "out of budget" and on_disk["e"]["data"]["done"] > 0
    assert on_disk["a"]["figures"][0]["baseline"] == "some baseline"
    # The file read inside b (after a) already held a's result, and b marked as running.
    during_b = {p["key"]: p["status"] for p in seen[1]["parts"]}
    assert during_b["a"] == "ok" and during_b["b"] == "running" and during_b["f"] == "pending"
    md = (tmp_path / "report.md").read_text()
    assert "| d. hangs | timeout |" in md


def test_a_spent_total_budget_skips_the_remaining_parts(tmp_path: Path) -> None:
    def slow(ctx: PartContext) -> None:
        while ctx.time_left() > 0:
            time.sleep(0.01)

    parts = [PartSpec("a", "slow", slow, 30), PartSpec("b", "never", slow, 30)]
    report = run_parts(parts, _report(parts), tmp_path, total_budget_s=1.2, grace_s=0.3, log=lambda _m: None)
    assert report.parts[0].status == "ok"
    assert report.parts[1].status == "skipped" and "total budget" in (report.parts[1].reason or "")


def test_missing_packages_fail_with_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        cli, "REQUIRED", (("numpy", "numpy"), ("no_such_mod_a", "pkg-a"), ("no_such_mod_b", "pkg-b"))
    )
    assert cli.main([str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["gpu_check: missing Python packages: pkg-a, pkg-b (carry wheels: scripts/gpu_wheels.sh)"]
    assert not (tmp_path / "out").exists()


def test_the_real_import_set_is_present_here() -> None:
    assert cli.missing_packages() == []


def test_the_gpu_serving_workloads_fit_the_context_window() -> None:
    from drift_agent.gpucheck.parts import serving_workloads

    share, paper = serving_workloads(dry_run=False)
    for wl in (share, paper):
        assert all(o >= 2 and p >= 4 and p + o <= 8192 for p, o in wl.lengths), wl.name
        assert wl.ttft_ms > 0 and wl.tpot_ms > 0
    longs = [p for i, (p, _o) in enumerate(paper.lengths) if i % 3 == 2]
    assert min(longs) >= 2048 and max(p for p, _o in share.lengths) <= 2048

"""Part d when its budget runs out mid-sweep: it fits what it measured, saves the profile and says so."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from drift_agent.engine.measure import EngineMeasurer
from drift_agent.gpucheck import parts
from drift_agent.gpucheck.report import PartResult
from drift_agent.gpucheck.runner import PartContext

pytestmark = pytest.mark.slow  # builds the tiny engine and profiles it


@dataclasses.dataclass
class _Ctx(PartContext):
    spent: bool = False

    def time_left(self) -> float:
        return 0.0 if self.spent else 100.0


def test_a_profile_cut_short_is_fitted_from_its_measurements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = PartResult("d", "profile", 60, status="running")
    ctx = _Ctx(res, time.monotonic() + 60, tmp_path, True, {})
    real = EngineMeasurer.decode
    calls = 0

    def decode(self: EngineMeasurer, *args: Any) -> float:
        nonlocal calls
        calls += 1
        ctx.spent = calls >= 6  # the budget runs out after the 6th decode point
        return real(self, *args)

    monkeypatch.setattr(EngineMeasurer, "decode", decode)
    parts.part_profile(ctx)
    assert res.status == "truncated" and "decode" in (res.reason or "")
    assert calls == 6
    rows = res.data["tables"]["fit error per SM count"]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert "truncated" in saved["profiles"][0]["notes"]
    assert all(f.workload and f.baseline for f in res.figures)

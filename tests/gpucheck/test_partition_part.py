"""Part c (partitions bite) against a simulated device: streams whose kernels take time inversely
proportional to their SM count. Checks the bookkeeping this CPU machine cannot otherwise run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import drift_agent.partition
from drift_agent.gpucheck import parts
from drift_agent.gpucheck.report import PartResult
from drift_agent.gpucheck.runner import PartContext
from drift_agent.partition.base import Split


class _Stream:
    def __init__(self, sms: int) -> None:
        self.sms, self.clock = sms, 0.0


class _Event:
    t = 0.0

    def record(self, stream: _Stream) -> None:
        self.t = stream.clock

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _Event) -> float:
        return end.t - self.t


class _Tensor:
    def normal_(self) -> _Tensor:
        return self

    def copy_(self, _src: _Tensor) -> None:
        _FakeTorch.current.clock += 10.0 / _FakeTorch.current.sms


class _Cuda:
    Event = staticmethod(lambda enable_timing=True: _Event())

    @staticmethod
    @contextmanager
    def stream(s: _Stream) -> Iterator[None]:
        saved, _FakeTorch.current = _FakeTorch.current, s
        try:
            yield
        finally:
            _FakeTorch.current = saved

    synchronize = staticmethod(lambda: None)
    empty_cache = staticmethod(lambda: None)


class _FakeTorch:
    current = _Stream(132)
    bfloat16 = "bfloat16"
    cuda = _Cuda
    device = staticmethod(lambda *a: "cuda")
    randn = staticmethod(lambda *a, **k: _Tensor())
    empty = staticmethod(lambda *a, **k: _Tensor())
    empty_like = staticmethod(lambda _t: _Tensor())

    @staticmethod
    def mm(_a: _Tensor, _b: _Tensor, out: _Tensor) -> None:
        _FakeTorch.current.clock += 1000.0 / _FakeTorch.current.sms


class _Partitioner:
    name, reason, total_sms = "green-context", None, 132
    splits = [Split(132, 0), Split(80, 52), Split(0, 132)]

    def streams_for(self, split: Split) -> tuple[_Stream, _Stream]:
        return _Stream(split.prefill_sms or 1), _Stream(split.decode_sms or 1)

    def realized_sm_counts(self, split: Split) -> tuple[int, int]:
        return split.prefill_sms, split.decode_sms

    def close(self) -> None:
        pass


def test_part_c_records_time_against_sm_count_and_co_run_slowdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parts, "_cuda", lambda _ctx: _FakeTorch)
    monkeypatch.setattr(drift_agent.partition, "make_partitioner", lambda *a, **k: _Partitioner())
    res = PartResult("c", "partitions", 30, status="running")
    ctx = PartContext(res, time.monotonic() + 30, tmp_path, False, {})
    parts.part_partitions(ctx)
    assert res.status == "running"  # the runner turns it into ok
    rows = res.data["tables"]["time vs SM count"]
    assert [r["split"] for r in rows] == ["P132/D0", "P80/D52", "P0/D132"]
    mixed = rows[1]
    assert mixed["gemm ms P"] == pytest.approx(1000 / 80)
    assert mixed["copy ms D"] == pytest.approx(10 / 52)
    assert mixed["co-run GEMM slowdown"] == pytest.approx(1.0)
    figures: dict[str, Any] = {f.name: f for f in res.figures}
    ratio = figures["GEMM time on 80 prefill SMs / whole device"]
    assert ratio.value == pytest.approx(132 / 80)
    assert "ideal scaling 1.65x" in ratio.workload
    assert all(f.workload and f.baseline for f in res.figures)
    assert ctx.shared["peak_tflops"] == pytest.approx(2 * 8192**3 / (1000 / 132) / 1e9)

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from drift_agent.partition import (
    GreenContextPartitioner,
    MpsPartitioner,
    PartitionError,
    SharedPartitioner,
    Split,
    arch_constraints,
    candidate_splits,
    make_partitioner,
    mps_percentages,
    nearest_split,
    thread_budget,
)

# --- pure split arithmetic ----------------------------------------------------------------------------


def test_candidate_splits_h100() -> None:
    got = [(s.prefill_sms, s.decode_sms) for s in candidate_splits(132, 8, 8)]
    assert got == [(132, 0), (112, 20), (104, 28), (96, 36), (88, 44), (80, 52), (72, 60), (0, 132)]


def test_candidate_splits_a100_subsamples_keeping_extremes() -> None:
    splits = candidate_splits(108, *arch_constraints((8, 0)))
    mixed = [s for s in splits if s.is_mixed]
    assert splits[0] == Split(108, 0) and splits[-1] == Split(0, 108) and len(mixed) == 6
    assert mixed[0] == Split(92, 16) and mixed[-1] == Split(54, 54)
    assert all(s.prefill_sms % 2 == 0 and s.prefill_sms >= s.decode_sms >= 16 for s in mixed)
    assert [s.prefill_sms for s in mixed] == sorted((s.prefill_sms for s in mixed), reverse=True)


def test_candidate_splits_small_and_options() -> None:
    assert candidate_splits(16, 8, 8) == [Split(16, 0), Split(0, 16)]  # no mixed split fits
    assert candidate_splits(4, 1, 1, min_decode_sms=1) == [Split(4, 0), Split(3, 1), Split(2, 2), Split(0, 4)]
    free = candidate_splits(64, 8, 8, min_decode_sms=8, prefill_majority=False, max_mixed=100)
    assert Split(8, 56) in free and Split(56, 8) in free
    assert candidate_splits(132, 8, 8, max_mixed=1) == [Split(132, 0), Split(112, 20), Split(0, 132)]
    assert candidate_splits(132, 8, 8, max_mixed=0) == [Split(132, 0), Split(0, 132)]
    assert all(s.prefill_sms % 8 == 0 for s in candidate_splits(132, 5, 8) if s.is_mixed)
    with pytest.raises(ValueError):
        candidate_splits(0, 8, 8)


def test_arch_constraints_table() -> None:
    assert arch_constraints((6, 1)) == (1, 1)
    assert arch_constraints((7, 5)) == (2, 2)
    assert arch_constraints((8, 9)) == (4, 2)
    assert arch_constraints((9, 0)) == (8, 8) and arch_constraints((10, 0)) == (8, 8)
    with pytest.raises(ValueError, match="6.0"):
        arch_constraints((5, 2))


def test_split_and_helpers() -> None:
    s = Split(96, 36)
    assert s.total == 132 and s.is_mixed and s.label == "P96/D36" and not Split(0, 8).is_mixed
    with pytest.raises(ValueError):
        Split(-1, 4)
    with pytest.raises(ValueError):
        Split(0, 0)
    splits = candidate_splits(132, 8, 8)
    assert nearest_split(splits, 0.7) == Split(96, 36)
    assert nearest_split(splits, 0.99) == Split(112, 20)
    assert thread_budget(Split(3, 1), 8) == (6, 2)
    assert thread_budget(Split(1, 100), 4) == (1, 3)
    assert thread_budget(Split(4, 0), 4) == (4, 0) and thread_budget(Split(2, 2), 1) == (1, 1)


# --- shared -------------------------------------------------------------------------------------------


def test_shared_partitioner_is_nominal() -> None:
    p = SharedPartitioner(8, reason="why")
    assert p.available() and p.reason == "why" and p.supports_runtime_switch
    assert p.splits[0] == Split(8, 0) and p.splits[-1] == Split(0, 8) and any(s.is_mixed for s in p.splits)
    mixed = next(s for s in p.splits if s.is_mixed)
    assert p.streams_for(mixed) == (None, None)
    assert p.realized_sm_counts(mixed) == (8, 8) and p.realized_sm_counts(Split(0, 8)) == (0, 8)
    with pytest.raises(PartitionError, match="not created"):
        p.streams_for(Split(3, 5))
    assert p.describe()["backend"] == "shared"


def test_make_partitioner_degrades_to_shared_without_gpu() -> None:
    auto = make_partitioner("auto", "cpu")
    assert isinstance(auto, SharedPartitioner) and auto.reason and "nominal" in auto.reason
    for backend in ("green-context", "mps"):
        p = make_partitioner(backend, "cuda:0")
        assert isinstance(p, SharedPartitioner) and p.available() and "unavailable" in (p.reason or "")
    assert "needs a CUDA device" in (make_partitioner("mps", "cpu").reason or "")
    custom = [Split(2, 0), Split(1, 1), Split(0, 2)]
    assert make_partitioner("shared", None, splits=custom).splits == custom
    with pytest.raises(ValueError):
        make_partitioner("bogus", "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device"):
        make_partitioner("auto", "tpu")


# --- MPS ----------------------------------------------------------------------------------------------


def test_mps_unavailable_without_daemon() -> None:
    p = MpsPartitioner(132, Split(96, 36), env={}, which=lambda _: None, exists=lambda _: False)
    assert not p.available() and "nvidia-mps/control not found" in (p.reason or "")
    assert "not on PATH" in (p.reason or "") and not p.supports_runtime_switch


def test_mps_percentages_env_and_no_runtime_switch() -> None:
    env = {"CUDA_MPS_PIPE_DIRECTORY": "/run/mps", "CUDA_MPS_LOG_DIRECTORY": "/var/log/mps"}
    seen: list[str] = []
    p = MpsPartitioner(132, Split(96, 36), env=env, exists=lambda path: seen.append(path) or True)
    assert p.available() and seen == ["/run/mps/control"] and p.reason is None
    assert p.percentages() == (73, 28)
    pre, dec = p.env_for()
    assert (
        pre["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "73" and dec["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "28"
    )
    assert pre["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mps" and dec["CUDA_MPS_LOG_DIRECTORY"] == "/var/log/mps"
    assert p.splits == [Split(96, 36)] and p.streams_for(Split(96, 36)) == (None, None)
    rp, rd = p.realized_sm_counts(Split(96, 36))
    assert rp >= 96 and rd >= 36
    with pytest.raises(PartitionError, match="cannot switch"):
        p.streams_for(Split(112, 20))
    assert mps_percentages(Split(132, 0), 132) == (100, 0) and mps_percentages(Split(1, 131), 132) == (1, 100)
    with pytest.raises(ValueError):
        MpsPartitioner(100, Split(96, 36), env={})


# --- green contexts -----------------------------------------------------------------------------------


def test_green_context_reports_unavailable_on_this_machine() -> None:
    p = GreenContextPartitioner()
    assert not p.available() and p.reason and p.splits == []
    with pytest.raises(PartitionError):
        p.streams_for(Split(96, 36))
    with pytest.raises(PartitionError, match="unavailable"):
        p.initialize()


def _res(count: int, min_part: int | None = None, align: int | None = None) -> Any:
    sm = SimpleNamespace(smCount=count)
    if min_part is not None:
        sm.minSmPartitionSize, sm.smCoscheduledAlignment = min_part, align
    return SimpleNamespace(sm=sm)


class FakeDriver:
    """The slice of cuda.bindings.driver the partitioner uses; records what it created."""

    CUresult = SimpleNamespace(CUDA_SUCCESS=0)
    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM=1)
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, total=132, version=12080, extra_sms=0, min_part=None, align=None, fail=None):
        self.total, self.version, self.extra, self.fail = total, version, extra_sms, fail
        self.min_part, self.align = min_part, align
        self.created: list[Any] = []
        self.destroyed: list[Any] = []
        self.streams_destroyed: list[Any] = []

    def _r(self, name: str, *values: Any) -> tuple:
        return (700 if self.fail == name else 0, *values)

    def cuInit(self, flags):
        return self._r("cuInit")

    def cuDriverGetVersion(self):
        return (0, self.version)

    def cuDeviceGet(self, i):
        return self._r("cuDeviceGet", i)

    def cuDeviceGetDevResource(self, dev, kind):
        return self._r("cuDeviceGetDevResource", _res(self.total, self.min_part, self.align))

    def cuDevSmResourceSplitByCount(self, n, res, flags, min_count):
        got = min_count + self.extra
        return self._r("cuDevSmResourceSplitByCount", [_res(got)], 1, _res(res.sm.smCount - got))

    def cuDevResourceGenerateDesc(self, resources, n):
        return self._r("cuDevResourceGenerateDesc", ("desc", resources[0].sm.smCount))

    def cuGreenCtxCreate(self, desc, dev, flags):
        self.created.append(desc)
        return self._r("cuGreenCtxCreate", len(self.created))

    def cuGreenCtxStreamCreate(self, gctx, flags, priority):
        return self._r("cuGreenCtxStreamCreate", 1000 + gctx)

    def cuStreamDestroy(self, stream):
        self.streams_destroyed.append(stream)
        return (0,)

    def cuGreenCtxDestroy(self, handle):
        self.destroyed.append(handle)
        return (0,)

    def cuGetErrorName(self, err):
        return (0, b"CUDA_ERROR_FAKE")


class FakeStream:
    def __init__(self, device=None, priority=0):
        self.device, self.priority = device, priority

    @staticmethod
    def priority_range():
        return (0, -5)


class FakeGreenContext:
    made: list[int] = []

    def __init__(self, num_sms: int) -> None:
        self.num_sms = num_sms

    @staticmethod
    def create(*, num_sms, device_id=None):
        FakeGreenContext.made.append(num_sms)
        return FakeGreenContext(num_sms)

    def Stream(self):
        return ("green-stream", self.num_sms)


def fake_torch(sms: int = 132, cc: tuple[int, int] = (9, 0), green: bool = True) -> Any:
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 1,
        get_device_properties=lambda i: SimpleNamespace(multi_processor_count=sms, major=cc[0], minor=cc[1]),
        init=lambda: None,
        Stream=FakeStream,
        get_stream_from_external=lambda ptr, device=None: ("external", ptr),
        green_contexts=SimpleNamespace(SUPPORTED=green, GreenContext=FakeGreenContext),
    )
    return SimpleNamespace(cuda=cuda, device=lambda kind, idx: (kind, idx))


def test_driver_backend_creates_disjoint_verified_partitions() -> None:
    drv = FakeDriver()
    p = GreenContextPartitioner(torch_module=fake_torch(), driver_module=drv)
    assert p.available() and p.backend == "driver" and (p.min_size, p.alignment) == (8, 8)
    assert p.splits == candidate_splits(132, 8, 8)
    p.initialize()
    assert len(drv.created) == 12  # two green contexts per mixed split
    pre, dec = p.streams_for(Split(112, 20))
    assert pre[0] == "external" and dec[0] == "external" and pre != dec
    assert p.realized_sm_counts(Split(112, 20)) == (112, 20)
    assert p.realized_sm_counts(Split(0, 132)) == (0, 132)
    assert isinstance(p.streams_for(Split(132, 0))[0], FakeStream)
    p.close()
    assert sorted(drv.destroyed) == list(range(1, 13))
    assert sorted(drv.streams_destroyed) == list(range(1001, 1013))


def test_driver_reported_partition_limits_are_used() -> None:
    p = GreenContextPartitioner(torch_module=fake_torch(), driver_module=FakeDriver(min_part=4, align=4))
    assert (p.min_size, p.alignment) == (4, 4)
    assert Split(116, 16) in p.splits


def test_realized_count_mismatch_is_a_clear_error() -> None:
    drv = FakeDriver(extra_sms=8)
    p = GreenContextPartitioner(torch_module=fake_torch(), driver_module=drv)
    with pytest.raises(PartitionError, match="P112/D20 was realised as P120/D12"):
        p.initialize()
    assert sorted(drv.destroyed) == sorted(range(1, len(drv.created) + 1))  # nothing left half-created


def test_driver_error_codes_are_named() -> None:
    p = GreenContextPartitioner(torch_module=fake_torch(), driver_module=FakeDriver(fail="cuGreenCtxCreate"))
    with pytest.raises(PartitionError, match="cuGreenCtxCreate failed \\(CUDA_ERROR_FAKE\\)"):
        p.initialize()


def test_invalid_configured_splits_are_rejected() -> None:
    with pytest.raises(PartitionError, match="multiple of 8"):
        GreenContextPartitioner(
            splits=[Split(100, 32)], torch_module=fake_torch(), driver_module=FakeDriver()
        )
    with pytest.raises(PartitionError, match="add up"):
        GreenContextPartitioner(splits=[Split(96, 30)], torch_module=fake_torch(), driver_module=FakeDriver())


def test_torch_backend_is_prefill_capped() -> None:
    FakeGreenContext.made.clear()
    p = GreenContextPartitioner(torch_module=fake_torch(), driver_module=FakeDriver(version=12000))
    assert p.available() and p.backend == "torch"
    p.initialize()
    pre, dec = p.streams_for(Split(96, 36))
    assert pre == ("green-stream", 96) and dec.priority == -5
    assert p.realized_sm_counts(Split(96, 36)) == (96, 132)
    assert sorted(FakeGreenContext.made) == [72, 80, 88, 96, 104, 112]


def test_unavailable_reasons() -> None:
    old_driver_no_torch = GreenContextPartitioner(
        torch_module=fake_torch(green=False), driver_module=FakeDriver(version=12000)
    )
    assert not old_driver_no_torch.available()
    assert (
        "older than 12.4" in old_driver_no_torch.reason
        and "no green-context support" in old_driver_no_torch.reason
    )
    pascal_less = GreenContextPartitioner(torch_module=fake_torch(cc=(5, 2)), driver_module=FakeDriver())
    assert not pascal_less.available() and "6.0" in pascal_less.reason
    forced_torch = GreenContextPartitioner(backend="torch", torch_module=fake_torch(green=False))
    assert not forced_torch.available() and "driver API" not in forced_torch.reason
    small = GreenContextPartitioner(torch_module=fake_torch(sms=16), driver_module=FakeDriver(total=16))
    assert small.available() and small.splits == [Split(16, 0), Split(0, 16)]

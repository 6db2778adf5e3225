"""CUDA green-context partitioner: prefill and decode on disjoint SM partitions of one GPU, one process.

Every split is created once, at start; switching splits only selects another (prefill, decode) stream pair.
The whole-device ends (N, 0) and (0, N) use two plain streams, as SGLang does.

Two backends:

- `driver` (preferred when `cuda-python` is installed; CUDA ≥ 12.4): the SM resource is split once per mixed
  split with `cuDevSmResourceSplitByCount` into the prefill group and the *remainder*, and each becomes a green
  context with its own stream (`cuGreenCtxStreamCreate`, wrapped by `torch.cuda.get_stream_from_external`).
  The two partitions are disjoint by construction, and their realised SM counts are checked against the
  requested ones (a mismatch is a `PartitionError`).
- `torch` (`torch.cuda.green_contexts`, CUDA ≥ 12.8 builds): `GreenContext.create(num_sms=...)` carves each
  context from the *whole* device independently, so two contexts are not guaranteed disjoint. We therefore
  use it in "prefill-capped" mode: prefill runs on a green context of `prefill_sms` SMs, decode on a
  high-priority full-device stream (SGLang's `overlap_decode_full_sm`). Realised counts are reported as
  (prefill_sms, N); torch exposes no SM-count query, so the prefill side cannot be verified.

Partition sizes follow the device's minimum partition size and alignment, read from the driver
(`minSmPartitionSize`, `smCoscheduledAlignment`, CUDA 13) or else from the compute-capability table.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .base import Partitioner, PartitionError, Split, StreamPair
from .splits import arch_constraints, candidate_splits

Backend = Literal["auto", "driver", "torch"]
_MIN_DRIVER = 12040  # green contexts in the driver API


@dataclass
class _Group:
    prefill_stream: Any
    decode_stream: Any
    realized: tuple[int, int]
    handles: list[Any] = field(default_factory=list)  # green contexts to destroy on close
    raw_streams: list[Any] = field(default_factory=list)  # driver streams, destroyed before their contexts


class GreenContextPartitioner(Partitioner):
    name = "green-context"

    def __init__(
        self,
        device_index: int = 0,
        *,
        splits: Sequence[Split] | None = None,
        backend: Backend = "auto",
        max_mixed: int = 6,
        min_decode_sms: int = 16,
        torch_module: Any = None,
        driver_module: Any = None,
    ) -> None:
        super().__init__(total_sms=0)
        self.device_index = device_index
        self.backend: Literal["driver", "torch"] | None = None
        self.min_size = 0
        self.alignment = 0
        self._torch = torch_module
        self._driver = driver_module
        self._groups: dict[Split, _Group] = {}
        self._splits: list[Split] = []
        self._available = False
        try:
            self._probe(backend)
        except _Unavailable as e:
            self.reason = str(e)
            return
        self._available = True
        if splits is None:
            self._splits = candidate_splits(
                self.total_sms,
                self.min_size,
                self.alignment,
                max_mixed=max_mixed,
                min_decode_sms=min_decode_sms,
            )
        else:
            self._splits = [self._validated(s) for s in splits]

    # --- probing ------------------------------------------------------------------------------------
    def _probe(self, backend: Backend) -> None:
        if self._torch is None:
            try:
                self._torch = importlib.import_module("torch")
            except ImportError:
                raise _Unavailable("torch is not installed") from None
        torch = self._torch
        if not torch.cuda.is_available():
            raise _Unavailable("no CUDA device (torch.cuda.is_available() is False)")
        if self.device_index >= torch.cuda.device_count():
            raise _Unavailable(f"no CUDA device with index {self.device_index}")
        props = torch.cuda.get_device_properties(self.device_index)
        self.total_sms = int(props.multi_processor_count)
        cc = (int(props.major), int(props.minor))
        try:
            table_min, table_align = arch_constraints(cc)
        except ValueError as e:
            raise _Unavailable(str(e)) from None

        reasons: list[str] = []
        if backend in ("auto", "driver"):
            why = self._probe_driver()
            if why is None:
                self.backend = "driver"
            else:
                reasons.append(f"driver API: {why}")
        if self.backend is None and backend in ("auto", "torch"):
            why = self._probe_torch()
            if why is None:
                self.backend = "torch"
            else:
                reasons.append(f"torch.cuda.green_contexts: {why}")
        if self.backend is None:
            raise _Unavailable("green contexts unavailable (" + "; ".join(reasons) + ")")

        self.min_size, self.alignment = table_min, table_align
        if self.backend == "driver":
            sm = self._device_sm_resource().sm
            self.min_size = int(getattr(sm, "minSmPartitionSize", 0) or table_min)
            self.alignment = int(getattr(sm, "smCoscheduledAlignment", 0) or table_align)

    def _probe_driver(self) -> str | None:
        if self._driver is None:
            try:
                self._driver = importlib.import_module("cuda.bindings.driver")
            except ImportError:
                return "cuda-python (cuda.bindings.driver) is not installed"
        drv = self._driver
        err, *_ = drv.cuInit(0)
        if _failed(drv, err):
            return f"cuInit failed ({_err_name(drv, err)})"
        err, version = drv.cuDriverGetVersion()
        if _failed(drv, err) or int(version) < _MIN_DRIVER:
            return f"CUDA driver {version} is older than 12.4"
        if not hasattr(drv, "cuGreenCtxStreamCreate"):
            return "cuda-python lacks cuGreenCtxStreamCreate (needs cuda-python >= 12.5)"
        return None

    def _probe_torch(self) -> str | None:
        gc = getattr(self._torch.cuda, "green_contexts", None)
        if gc is None or not getattr(gc, "SUPPORTED", False):
            return "this torch build has no green-context support (needs a CUDA >= 12.8 build)"
        if not hasattr(gc.GreenContext, "Stream"):
            return "this torch's GreenContext has no Stream() (needs torch >= 2.12)"
        return None

    def _validated(self, split: Split) -> Split:
        n = self.total_sms
        if split.total != n:
            raise PartitionError(f"split {split.label} does not add up to the device's {n} SMs")
        if split.is_mixed:
            p = split.prefill_sms
            if p < self.min_size or p % self.alignment or split.decode_sms < self.min_size:
                raise PartitionError(
                    f"split {split.label}: the prefill partition must be a multiple of {self.alignment} SMs and "
                    f"both partitions at least {self.min_size} SMs on this device"
                )
        return split

    # --- creation -----------------------------------------------------------------------------------
    def _check(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if _failed(self._driver, err):
            raise PartitionError(f"green context: {what} failed ({_err_name(self._driver, err)})")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _device_sm_resource(self) -> Any:
        drv = self._driver
        dev = self._check(drv.cuDeviceGet(self.device_index), "cuDeviceGet")
        return self._check(
            drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )

    def initialize(self) -> None:
        """Create every split's streams now. Raises PartitionError (nothing is left half-created)."""
        if not self._available:
            raise PartitionError(f"green contexts unavailable: {self.reason}")
        if self._groups:
            return
        torch = self._torch
        torch.cuda.init()
        groups: dict[Split, _Group] = {}
        try:
            for split in self._splits:
                if not split.is_mixed:
                    dev = torch.device("cuda", self.device_index)
                    groups[split] = _Group(
                        torch.cuda.Stream(device=dev),
                        torch.cuda.Stream(device=dev),
                        (split.prefill_sms, split.decode_sms),
                    )
                elif self.backend == "driver":
                    groups[split] = self._create_driver_group(split)
                else:
                    groups[split] = self._create_torch_group(split)
        except BaseException:
            self._destroy(groups)
            raise
        self._groups = groups

    def _create_driver_group(self, split: Split) -> _Group:
        drv = self._driver
        dev = self._check(drv.cuDeviceGet(self.device_index), "cuDeviceGet")
        whole = self._device_sm_resource()
        result, _n, remaining = self._check(
            drv.cuDevSmResourceSplitByCount(1, whole, 0, split.prefill_sms), "cuDevSmResourceSplitByCount"
        )
        got = (int(result[0].sm.smCount), int(remaining.sm.smCount))
        if got != (split.prefill_sms, split.decode_sms):
            raise PartitionError(
                f"green context split {split.label} was realised as P{got[0]}/D{got[1]} "
                f"(min partition {self.min_size}, alignment {self.alignment}); choose aligned splits"
            )
        group = _Group(None, None, got)
        streams = []
        for res in (result[0], remaining):
            desc = self._check(drv.cuDevResourceGenerateDesc([res], 1), "cuDevResourceGenerateDesc")
            gctx = self._check(
                drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                "cuGreenCtxCreate",
            )
            group.handles.append(gctx)
            raw = self._check(
                drv.cuGreenCtxStreamCreate(gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                "cuGreenCtxStreamCreate",
            )
            group.raw_streams.append(raw)
            streams.append(self._torch.cuda.get_stream_from_external(int(raw), device=self.device_index))
        group.prefill_stream, group.decode_stream = streams
        return group

    def _create_torch_group(self, split: Split) -> _Group:
        torch = self._torch
        ctx = torch.cuda.green_contexts.GreenContext.create(
            num_sms=split.prefill_sms, device_id=self.device_index
        )
        # Decode is not capped here (see module docstring): a full-device stream with the highest priority.
        _low, high = torch.cuda.Stream.priority_range()
        decode = torch.cuda.Stream(device=torch.device("cuda", self.device_index), priority=high)
        return _Group(ctx.Stream(), decode, (split.prefill_sms, self.total_sms), [ctx])

    def _destroy(self, groups: dict[Split, _Group]) -> None:
        for group in groups.values():
            if self.backend == "driver":
                for raw in group.raw_streams:
                    self._driver.cuStreamDestroy(raw)
                for h in group.handles:
                    self._driver.cuGreenCtxDestroy(h)
            group.raw_streams.clear()
            group.handles.clear()  # torch GreenContexts are destroyed with their last reference

    # --- Partitioner --------------------------------------------------------------------------------
    def available(self) -> bool:
        return self._available

    @property
    def splits(self) -> list[Split]:
        return list(self._splits)

    def _group(self, split: Split) -> _Group:
        self._check_known(split)
        if not self._groups:
            self.initialize()
        return self._groups[split]

    def streams_for(self, split: Split) -> StreamPair:
        g = self._group(split)
        return (g.prefill_stream, g.decode_stream)

    def realized_sm_counts(self, split: Split) -> tuple[int, int]:
        return self._group(split).realized

    def close(self) -> None:
        self._destroy(self._groups)
        self._groups = {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mode": self.backend,
            "min_partition_sms": self.min_size,
            "alignment": self.alignment,
        }


class _Unavailable(Exception):
    pass


def _failed(drv: Any, err: Any) -> bool:
    return err != drv.CUresult.CUDA_SUCCESS


def _err_name(drv: Any, err: Any) -> str:
    try:
        ok, name = drv.cuGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is cosmetic; never mask the real error
        return str(err)

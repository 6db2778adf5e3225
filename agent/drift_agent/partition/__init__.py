"""SM partitioning of one device between prefill and decode (green contexts, MPS, or nominal/shared)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from .base import Partitioner, PartitionError, Split, StreamPair
from .green_context import GreenContextPartitioner
from .mps import MpsPartitioner, mps_percentages
from .shared import SharedPartitioner, nominal_splits, thread_budget
from .splits import arch_constraints, candidate_splits, nearest_split

__all__ = [
    "GreenContextPartitioner",
    "MpsPartitioner",
    "PartitionError",
    "Partitioner",
    "SharedPartitioner",
    "Split",
    "StreamPair",
    "arch_constraints",
    "candidate_splits",
    "make_partitioner",
    "mps_percentages",
    "nearest_split",
    "nominal_splits",
    "thread_budget",
]

BackendName = Literal["auto", "green-context", "mps", "shared"]


def _parse_device(device: Any) -> tuple[str, int]:
    """("cpu" | "cuda", index) from "cpu", "cuda", "cuda:1", a torch.device or None (= cpu)."""
    if device is None:
        return "cpu", 0
    kind = getattr(device, "type", None)
    if kind is not None:
        return str(kind), int(getattr(device, "index", None) or 0)
    text = str(device)
    kind, _, idx = text.partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()):
        raise ValueError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)")
    return kind, int(idx or 0)


def _cuda_sms(index: int) -> int | None:
    """SM count of CUDA device `index`, or None when torch or the device is unavailable."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def make_partitioner(
    backend: BackendName,
    device: Any = "cpu",
    *,
    splits: Sequence[Split] | None = None,
    mps_prefill_share: float = 0.5,
    max_mixed: int = 6,
    env: dict[str, str] | None = None,
) -> Partitioner:
    """The partitioner for `backend` on `device`, degrading to `SharedPartitioner` (with `.reason`) when the
    requested mechanism is unavailable. Green contexts are created here, once; a split that the device
    realises with other SM counts raises `PartitionError` when green contexts were asked for explicitly, and
    degrades to shared under "auto"."""
    if backend not in ("auto", "green-context", "mps", "shared"):
        raise ValueError(f"unknown partition backend {backend!r}")
    kind, index = _parse_device(device)
    total = _cuda_sms(index) if kind == "cuda" else None
    if total is None:
        cores = os.cpu_count() or 1
        if kind == "cuda":
            why = f"CUDA device {index} unavailable; splits are nominal over {cores} CPU cores"
        elif backend in ("auto", "shared"):
            why = "CPU: splits are nominal"
        else:
            why = f"{backend} needs a CUDA device; running on CPU"
        return SharedPartitioner(cores, device="cpu", splits=splits, reason=why)

    def shared(why: str | None) -> SharedPartitioner:
        return SharedPartitioner(total, device="cuda", device_index=index, splits=splits, reason=why)

    if backend == "shared":
        return shared(None)
    if backend == "mps":
        split = nearest_split(list(splits) if splits else nominal_splits(total), mps_prefill_share)
        mps = MpsPartitioner(total, split, env=env)
        return mps if mps.available() else shared(f"mps unavailable: {mps.reason}")

    gc = GreenContextPartitioner(index, splits=splits, max_mixed=max_mixed)
    if not gc.available():
        return shared(f"green contexts unavailable: {gc.reason}")
    try:
        gc.initialize()
    except PartitionError as e:
        if backend == "green-context":
            raise
        gc.close()
        return shared(f"green contexts failed: {e}")
    return gc

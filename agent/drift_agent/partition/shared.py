"""The no-op partitioner: CPU, or a GPU without green contexts. Splits are nominal.

The dispatcher still chooses a split (so the same scheduling code and traces run everywhere), but both phases
use the whole device: realised SM counts are (N, N) for a mixed split. On CUDA both phases get their own plain
stream (the same pair for every split) so they may still overlap; on CPU the streams are None.

CPU thread budget: `thread_budget` turns a split into per-phase thread counts for an executor that runs the
prefill and decode batches in two threads. It is advisory: torch's intra-op pool size is process-wide, so an
executor that applies it must set it around each phase's kernels itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Partitioner, Split, StreamPair
from .splits import candidate_splits


def nominal_splits(total: int, max_mixed: int = 6) -> list[Split]:
    """Candidate splits for a device without partition constraints (1 SM/core granularity)."""
    return candidate_splits(total, 1, 1, max_mixed=max_mixed, min_decode_sms=max(1, total // 8))


def thread_budget(split: Split, total_threads: int) -> tuple[int, int]:
    """(prefill threads, decode threads) proportional to the split; each running phase gets at least one."""
    if total_threads <= 0:
        raise ValueError("total_threads must be positive")
    if not split.is_mixed:
        return (total_threads, 0) if split.prefill_sms else (0, total_threads)
    if total_threads == 1:
        return 1, 1  # oversubscribed: both phases share the single core
    prefill = round(total_threads * split.prefill_sms / split.total)
    prefill = min(max(prefill, 1), total_threads - 1)
    return prefill, total_threads - prefill


class SharedPartitioner(Partitioner):
    name = "shared"

    def __init__(
        self,
        total_sms: int,
        *,
        device: str = "cpu",
        device_index: int = 0,
        splits: Sequence[Split] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(total_sms, reason)
        if total_sms <= 0:
            raise ValueError("total_sms must be positive")
        self.device = device
        self.device_index = device_index
        self._splits = list(splits) if splits is not None else nominal_splits(total_sms)
        self._streams: StreamPair | None = None

    def available(self) -> bool:
        return True

    @property
    def splits(self) -> list[Split]:
        return list(self._splits)

    def streams_for(self, split: Split) -> StreamPair:
        self._check_known(split)
        if self.device != "cuda":
            return (None, None)
        if self._streams is None:
            import torch

            dev: Any = torch.device("cuda", self.device_index)
            self._streams = (torch.cuda.Stream(device=dev), torch.cuda.Stream(device=dev))
        return self._streams

    def realized_sm_counts(self, split: Split) -> tuple[int, int]:
        self._check_known(split)
        n = self.total_sms
        return (n if split.prefill_sms else 0, n if split.decode_sms else 0)

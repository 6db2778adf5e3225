"""MPS mode: prefill and decode in *separate processes*, each capped by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE.

For operators who run the phases as two processes under an MPS control daemon (like Semi-PD). The percentage is
fixed when a process creates its CUDA context, so **this partitioner cannot switch splits at run time**: it
serves exactly one split, `streams_for` refuses any other, and changing the split means restarting the worker
processes with new environments (`env_for`). The percentage is a *limit*, not a reservation: the two clients may
still share SMs unless the daemon uses static SM partitioning (`nvidia-cuda-mps-control -S` with
`CUDA_MPS_SM_PARTITION`), and sharing the KV cache across processes needs CUDA IPC handles, which the engine
must provide. This module only reports availability and computes the environments.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping

from .base import Partitioner, PartitionError, Split, StreamPair

DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def mps_percentages(split: Split, total_sms: int) -> tuple[int, int]:
    """Per-process active-thread percentages (1..100) giving each phase at least its SM count."""
    if total_sms <= 0:
        raise ValueError("total_sms must be positive")

    def pct(sms: int) -> int:
        return min(100, max(1, math.ceil(100 * sms / total_sms))) if sms > 0 else 0

    return pct(split.prefill_sms), pct(split.decode_sms)


class MpsPartitioner(Partitioner):
    name = "mps"
    supports_runtime_switch = False

    def __init__(
        self,
        total_sms: int,
        split: Split,
        *,
        env: Mapping[str, str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
        exists: Callable[[str], bool] = os.path.exists,
    ) -> None:
        super().__init__(total_sms)
        if split.total > total_sms:
            raise ValueError(f"split {split.label} exceeds the device's {total_sms} SMs")
        self.split = split
        self._env = dict(os.environ if env is None else env)
        self.pipe_directory = self._env.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIRECTORY)
        control = os.path.join(self.pipe_directory, "control")
        self._daemon = exists(control)
        if not self._daemon:
            tool = "installed" if which("nvidia-cuda-mps-control") else "not on PATH"
            self.reason = (
                f"no MPS control daemon: {control} not found (nvidia-cuda-mps-control is {tool}; "
                "start it with `nvidia-cuda-mps-control -d`)"
            )

    def available(self) -> bool:
        return self._daemon

    @property
    def splits(self) -> list[Split]:
        return [self.split]

    def percentages(self, split: Split | None = None) -> tuple[int, int]:
        return mps_percentages(split or self.split, self.total_sms)

    def env_for(self, split: Split | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """Environment additions for the (prefill process, decode process)."""
        p, d = self.percentages(split)
        base = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_directory}
        if "CUDA_MPS_LOG_DIRECTORY" in self._env:
            base["CUDA_MPS_LOG_DIRECTORY"] = self._env["CUDA_MPS_LOG_DIRECTORY"]
        return (
            {**base, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(p)},
            {**base, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(d)},
        )

    def streams_for(self, split: Split) -> StreamPair:
        if split != self.split:
            raise PartitionError(
                f"mps: the split is fixed per process at context creation ({self.split.label}); "
                f"cannot switch to {split.label} at run time — restart the workers with env_for()"
            )
        return (None, None)  # each process uses its own default stream

    def realized_sm_counts(self, split: Split) -> tuple[int, int]:
        """Approximate: the driver turns the percentage into an SM limit (rounding is the driver's)."""
        self._check_known(split)
        p, d = self.percentages(split)
        n = self.total_sms
        return (min(n, math.ceil(p * n / 100)), min(n, math.ceil(d * n / 100)))

"""The partitioner interface: how a (prefill SMs, decode SMs) split is realised on a device.

A `Partitioner` is created once at engine start with every split it will ever serve (switching a split at run
time must be cheap: it only selects another pre-built stream pair). The scheduling code talks to this interface
only, so the same policy runs on green contexts, MPS, or a shared device (CPU, older GPUs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..core.errors import DriftError


class PartitionError(DriftError, RuntimeError):
    """A partition could not be created, or was realised with other SM counts than requested."""


@dataclass(frozen=True, order=True)
class Split:
    """SMs given to prefill and to decode. (N, 0) and (0, N) are the whole device for one phase."""

    prefill_sms: int
    decode_sms: int

    def __post_init__(self) -> None:
        if self.prefill_sms < 0 or self.decode_sms < 0 or self.prefill_sms + self.decode_sms <= 0:
            raise ValueError(f"invalid split {self.prefill_sms}/{self.decode_sms}")

    @property
    def total(self) -> int:
        return self.prefill_sms + self.decode_sms

    @property
    def is_mixed(self) -> bool:
        """Both phases own SMs (they can run concurrently)."""
        return self.prefill_sms > 0 and self.decode_sms > 0

    @property
    def label(self) -> str:
        return f"P{self.prefill_sms}/D{self.decode_sms}"

    def __str__(self) -> str:
        return self.label


# (prefill stream, decode stream): torch.cuda.Stream objects, or None for "the current/default stream".
StreamPair = tuple[Any, Any]


class Partitioner(ABC):
    name: str = "abstract"
    # Whether `streams_for` can switch between splits while the process runs (MPS cannot).
    supports_runtime_switch: bool = True

    def __init__(self, total_sms: int, reason: str | None = None) -> None:
        self.total_sms = total_sms
        # Why this partitioner is unavailable, or why the engine fell back to it; None when nothing to say.
        self.reason = reason

    @abstractmethod
    def available(self) -> bool:
        """Whether this mechanism can partition the device in this process."""

    @property
    @abstractmethod
    def splits(self) -> list[Split]:
        """Every split this partitioner serves, (N, 0) first and (0, N) last when present."""

    @abstractmethod
    def streams_for(self, split: Split) -> StreamPair:
        """The (prefill, decode) streams realising `split`; raises PartitionError for an unknown split."""

    @abstractmethod
    def realized_sm_counts(self, split: Split) -> tuple[int, int]:
        """SMs each phase can actually use under `split` (e.g. a shared device gives both the whole GPU)."""

    def close(self) -> None:
        """Release device resources (after both streams are synchronised). Default: nothing held."""
        return None

    def _check_known(self, split: Split) -> None:
        if split not in self.splits:
            known = ", ".join(s.label for s in self.splits)
            raise PartitionError(f"{self.name}: split {split.label} was not created at start (have: {known})")

    def describe(self) -> dict[str, Any]:
        """For logs and /debug endpoints."""
        return {
            "backend": self.name,
            "available": self.available(),
            "reason": self.reason,
            "total_sms": self.total_sms,
            "runtime_switch": self.supports_runtime_switch,
            "splits": [s.label for s in self.splits],
        }

"""`InstanceView`: what a routing policy may read of one instance.

The simulator's `SimInstance` implements it from its scheduler, block manager and performance model; the HTTP
router fills it from each agent's `GET /state`. Every figure is a snapshot at routing time: a policy reads, it
never changes an instance.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class InstanceView(Protocol):
    @property
    def index(self) -> int:
        """Stable id of the instance (its position in the simulator): the tie-break, and the key of
        `PrefixAffinityRouter.home`, so it must not change while the instance exists."""
        ...

    @property
    def load_tokens(self) -> int:
        """Work queued and held: prompt tokens still to prefill plus KV tokens held."""
        ...

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens queued or being prefilled whose KV is not computed yet."""
        ...

    @property
    def kv_usage(self) -> float:
        """Fraction (0..1) of the KV pool held by live sequences."""
        ...

    @property
    def kv_used_tokens(self) -> int:
        """KV tokens held (blocks held times the block size)."""
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def free_kv_blocks(self) -> int:
        """Free KV blocks (cached prefixes count as free: they are evictable)."""
        ...

    @property
    def block_size(self) -> int: ...

    @property
    def slo_attainment(self) -> float | None:
        """Fraction (0..1) of the instance's recent requests that met both their TTFT and TPOT targets; None
        when unknown (no recent requests, or nothing measures it: the simulator has no such window)."""
        ...

    def busy_for(self, now: float) -> float:
        """Seconds left of the step in flight at `now`; 0 when idle."""
        ...

    def queued_prefill_s(self) -> float:
        """Predicted seconds to prefill the `pending_prefill_tokens`."""
        ...

    def prefill_s(self, tokens: int) -> float:
        """Predicted seconds of one prompt of `tokens` alone on the whole device."""
        ...

    def decode_step_s(self, batch: int, kv_tokens: int) -> float:
        """Predicted seconds of one decode step of `batch` sequences holding `kv_tokens` KV tokens in all."""
        ...


def blocks_needed(tokens: int, block_size: int) -> int:
    """KV blocks that hold `tokens` tokens (`BlockManager.blocks_needed`)."""
    return -(-tokens // block_size)

"""How a preempted sequence gives its KV blocks back: dropped and recomputed later, or swapped to the host tier
and copied back (`--preemption-mode`). Pure: `auto` weighs the two per victim with the costs the engine (or the
simulator) measures or models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

PreemptionMode = Literal["recompute", "swap", "auto"]
PREEMPTION_MODES: tuple[str, ...] = get_args(PreemptionMode)


@dataclass
class SwapCosts:
    """Seconds to copy one KV block one way between the tiers, and to recompute one token's KV. The engine
    starts from its performance model and replaces both with measured rates as they come."""

    copy_s_per_block: float = 0.0
    recompute_s_per_token: float = 0.0

    def prefers_swap(self, num_blocks_to_copy: int, num_tokens: int) -> bool:
        """Swap when copying the blocks out and back costs less than recomputing the tokens (ties, and
        unknown costs, recompute: a swap also takes host memory)."""
        return 2 * num_blocks_to_copy * self.copy_s_per_block < num_tokens * self.recompute_s_per_token

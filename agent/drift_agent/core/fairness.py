"""Fair scheduling across clients by a virtual token counter (VTC, Sheng et al., OSDI'24 "Fairness in Serving
Large Language Models"). Pure: the scheduler charges each client for the tokens it serves, and orders the
waiting queue by (priority, the client's counter, arrival), so the least-served client's oldest request goes
first and a client flooding the queue only gets its share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

Fairness = Literal["none", "vtc"]
FAIRNESS: tuple[str, ...] = get_args(Fairness)

# VTC's default weights: an output token costs about twice a prompt token (decode is memory-bound).
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class VirtualTokenCounter:
    """Weighted service per client. `counter` orders the queue; `served` counts raw tokens (metrics)."""

    def __init__(self, prompt_weight: float = PROMPT_WEIGHT, output_weight: float = OUTPUT_WEIGHT) -> None:
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        self.served: dict[str, int] = {}

    def counter(self, client: str) -> float:
        return self.counters.get(client, 0.0)

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.counters[client] = (
            self.counters.get(client, 0.0)
            + self.prompt_weight * prompt_tokens
            + self.output_weight * output_tokens
        )
        self.served[client] = self.served.get(client, 0) + prompt_tokens + output_tokens

    def lift(self, client: str, active: Iterable[str]) -> None:
        """A client with no work in the system arrives: lift its counter to the least-served active client's
        (VTC's rule), so time away banks no credit to burst with later; never lowers it."""
        floor = min((self.counter(c) for c in set(active) if c != client), default=None)
        if floor is not None and floor > self.counter(client):
            self.counters[client] = floor

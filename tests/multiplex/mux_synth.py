"""A synthetic performance model with closed-form latencies, for dispatcher tests."""

from __future__ import annotations

from drift_agent.multiplex.perf_model import PerfModel, PrefillShape
from drift_agent.multiplex.schema import Contention


class SynthModel(PerfModel):
    """prefill: 1e-4 s per new token on the whole 132-SM device, ∝ 1/SMs;
    decode: (4 ms + 0.1 ms·B + 1 µs per 1K KV tokens·…) scaled by sqrt(132/SMs) (bandwidth-ish)."""

    def __init__(
        self,
        total_sms: int = 132,
        num_layers: int = 10,
        decode_slowdown: float = 1.2,
        prefill_slowdown: float = 1.1,
        per_token_s: float = 1e-4,
    ) -> None:
        self.total_sms = total_sms
        self.num_layers = num_layers
        self.per_token_s = per_token_s
        self.contention = Contention(decode_slowdown=decode_slowdown, prefill_slowdown=prefill_slowdown)

    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float:
        return sum(s.new_tokens for s in shapes) * self.per_token_s * self.total_sms / sms

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        return (0.004 + 1e-4 * batch_size + 1e-6 * kv_tokens / 1024) * (self.total_sms / sms) ** 0.5

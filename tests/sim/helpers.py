"""Shared builders for the simulator tests: tiny constant-latency models and small mixed workloads."""

from __future__ import annotations

from drift_agent.bench.workloads import RequestSpec, WorkloadParams, generate
from drift_agent.multiplex.perf_model import PerfModel, PrefillShape
from drift_agent.multiplex.schema import Contention
from drift_agent.partition.base import Split

WHOLE_DEVICE = [Split(1, 0), Split(0, 1)]


class ConstantModel(PerfModel):
    """Every prefill and every decode step takes `s` seconds: a single-phase, deterministic service time."""

    def __init__(self, s: float) -> None:
        self.total_sms = 1
        self.num_layers = 1
        self.contention = Contention()
        self.s = s

    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float:
        return self.s

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        return self.s


def mixed_long_and_chat(n: int, long_every: int = 4, long_len: int = 8192) -> list[RequestSpec]:
    """Long prompts with short answers interleaved with chat requests that decode long answers: the PD
    interference regime (a long prefill lands on many running decodes)."""
    n_long = n // long_every
    longs = iter(
        generate(
            "random",
            n_long,
            1,
            WorkloadParams(input_len=long_len, output_len=32, range_ratio=0.5),
            id_prefix="L",
        )
    )
    chats = iter(
        generate(
            "random",
            n - n_long,
            2,
            WorkloadParams(input_len=256, output_len=512, range_ratio=0.5),
            id_prefix="C",
        )
    )
    return [next(longs) if i % long_every == long_every - 1 else next(chats) for i in range(n)]

"""The simulated model executor: step latencies from the performance model instead of a forward pass.

Sequential policies (`prefill-first`, `chunked`): a batch runs on the whole device. Its items are either
one-token rows (decode steps, or a prompt's last token after a prefix-cache hit) or prefill chunks. The batch is
costed as *one forward pass* in which every row is a prefill shape of one new token over its context, i.e.
`prefill_time(chunks + rows)`: that reads the weights once and counts each row's attention over its context,
which is what a mixed (chunked-prefill) batch does on a GPU. With the analytic model this equals
`decode_time` for a pure decode batch (same FLOPs and bytes); with a fitted profile a pure decode batch uses the
profiled `decode_time`, and a mixed batch takes the larger of the combined prefill estimate and the decode time
of its rows (a fitted prefill form was not measured on one-token rows, so it must not undercut a measured
decode step). Rows are aggregated to their mean context so costing stays O(1) in model calls per batch.

Multiplexed policies (`static-split`, `drift`): `SimMuxExecutor` costs what `multiplex.mux_loop.MuxLanes`
launches: a decode step on the split's decode SMs and a block of prefill layers on its prefill SMs, each slowed
by the model's contention factor when the other lane is busy; each lane completes at its own time.

Model error (`InstanceConfig.model_error`): the device may be slower (or faster) than the performance model
the policies and the router predict with. `ScaledDevice` is that device: every step, lane launch and
fast-forwarded span takes the factor times what the model predicts (contention included), while the dispatcher
still plans with the model, so a drift run has a misjudged TPOT to steer `tpot_margin` against.

Sampled tokens: every sampling row gets `OUTPUT_TOKEN` (requests run with `ignore_eos` and a fixed length, so
the value only matters for prefix-cache identity of multi-turn histories, which stays per-session unique because
block hashes chain from the session's own prompt).
"""

from __future__ import annotations

import numpy as np

from ..core.scheduler import Batch
from ..multiplex.mux_loop import decode_step_time, prefill_block_time
from ..multiplex.perf_model import PerfModel, PrefillShape, Shapes
from ..multiplex.policies import PrefillJob
from ..partition.base import Split

OUTPUT_TOKEN = 1


class Sampled:
    """`{seq_id: token}` for a batch without building the dict: every item samples except the listed ones."""

    __slots__ = ("skip",)

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip

    def get(self, seq_id: int, default: int | None = None) -> int | None:
        return default if seq_id in self.skip else OUTPUT_TOKEN


ALL_SAMPLED = Sampled(set())  # a decode step: every row samples


class ScaledDevice(PerfModel):
    """The device a misjudging `model` runs on: every latency is `factor` x the model's (the contention
    slowdowns are the model's, applied to the scaled times), layer shares and SM counts are the model's."""

    def __init__(self, model: PerfModel, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"model error factor must be positive, got {factor}")
        self.model, self.factor = model, factor
        self.total_sms = model.total_sms
        self.num_layers = model.num_layers
        self.contention = model.contention
        self.layer_fractions = model.layer_fractions

    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float:
        return self.model._prefill_base(shapes, sms) * self.factor

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        return self.model._decode_base(batch_size, kv_tokens, sms) * self.factor

    # The public methods delegate whole (a model may override them, as the fitted one does mixed steps).
    def decode_slowdown(self, decode_sms: int) -> float:
        return self.model.decode_slowdown(decode_sms)

    def prefill_slowdown(self, prefill_sms: int) -> float:
        return self.model.prefill_slowdown(prefill_sms)

    def prefill_time(
        self, shapes: Shapes, sms: int, *, contended: bool = False, rows: int = 0, row_context: int = 0
    ) -> float:
        t = self.model.prefill_time(shapes, sms, contended=contended, rows=rows, row_context=row_context)
        return t * self.factor

    def decode_time(self, batch_size: int, kv_tokens: int, sms: int, *, contended: bool = False) -> float:
        return self.model.decode_time(batch_size, kv_tokens, sms, contended=contended) * self.factor

    def mixed_step_time(self, chunks: list[PrefillShape], rows: int, kv_tokens: int, sms: int) -> float:
        return self.model.mixed_step_time(chunks, rows, kv_tokens, sms) * self.factor

    def decode_times(
        self, batch_size: int, kv_tokens: np.ndarray, sms: int, *, contended: bool = False
    ) -> np.ndarray:
        return self.model.decode_times(batch_size, kv_tokens, sms, contended=contended) * self.factor


def device_model(model: PerfModel, model_error: float) -> PerfModel:
    """What the simulated device runs at: the model itself when it is exact (the same floats as ever)."""
    return model if model_error == 1.0 else ScaledDevice(model, model_error)


class SimExecutor:
    """Costs sequential batches (see the module docstring)."""

    def __init__(self, model: PerfModel) -> None:
        self.model = model
        self.sms = model.total_sms

    def batch(self, batch: Batch) -> tuple[float, Sampled]:
        """(latency, sampled tokens) of one batch on the whole device."""
        rows = 0
        kv = 0
        chunks: list[PrefillShape] = []
        skip: set[int] = set()
        for item in batch.items:
            n = item.num_new_tokens
            end = item.start + n
            if n == 1:
                rows += 1
                kv += end
            else:
                chunks.append(PrefillShape(n, item.start))
            seq = item.seq
            if end != len(seq.token_ids):  # `not item.samples`, inlined (once per row per step)
                skip.add(seq.seq_id)
        return self.time(rows, kv, chunks), Sampled(skip)

    def time(self, rows: int, kv: int, chunks: list[PrefillShape]) -> float:
        return self.model.mixed_step_time(chunks, rows, kv, self.sms)


class SimMuxExecutor:
    """The lanes' latencies on the virtual clock (`mux_loop.decode_step_time` / `prefill_block_time`): each
    lane's contention factor is fixed at its launch, by whether the other lane is busy then."""

    def __init__(self, model: PerfModel) -> None:
        self.model = model

    def decode(self, split: Split, batch: Batch, contended: bool) -> float:
        return decode_step_time(self.model, split, batch, contended)

    def prefill(self, split: Split, job: PrefillJob, layers: int, contended: bool) -> tuple[float, Sampled]:
        """(latency, sampled tokens) of `layers` layers of `job`; tokens only when they complete it."""
        t = prefill_block_time(self.model, split, job, layers, contended)
        return t, Sampled({i.seq.seq_id for i in job.batch.items if not i.samples})

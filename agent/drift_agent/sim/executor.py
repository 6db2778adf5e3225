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

Multiplexed policies (`static-split`, `drift`): `SimMuxExecutor` implements `multiplex.mux_loop.MuxExecutor`.
An iteration runs the decode step on the split's decode SMs and a block of prefill layers on its prefill SMs;
each phase is slowed by the model's contention factor when the other co-runs, and the iteration lasts as long
as the slower of the two (the loop post-processes both at its end, as the engine's loop does).

Sampled tokens: every sampling row gets `OUTPUT_TOKEN` (requests run with `ignore_eos` and a fixed length, so
the value only matters for prefix-cache identity of multi-turn histories, which stays per-session unique because
block hashes chain from the session's own prompt).
"""

from __future__ import annotations

from ..engine.scheduler import Batch
from ..multiplex.mux_loop import MuxStepResult
from ..multiplex.perf_model import FittedPerfModel, PerfModel, PrefillShape
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


class SimExecutor:
    """Costs sequential batches (see the module docstring)."""

    def __init__(self, model: PerfModel) -> None:
        self.model = model
        self.sms = model.total_sms
        self.fitted = isinstance(model, FittedPerfModel)

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
            if end != item.seq.num_tokens:
                skip.add(item.seq.seq_id)
        return self.time(rows, kv, chunks), Sampled(skip)

    def time(self, rows: int, kv: int, chunks: list[PrefillShape]) -> float:
        model, sms = self.model, self.sms
        if not chunks:
            return model.decode_time(rows, kv, sms)
        if not rows:
            return model.prefill_time(chunks, sms)
        mean_context = max(kv // rows - 1, 0)
        mixed = model.prefill_time([*chunks, *([PrefillShape(1, mean_context)] * rows)], sms)
        if self.fitted:
            mixed = max(mixed, model.decode_time(rows, kv, sms), model.prefill_time(chunks, sms))
        return mixed


class SimMuxExecutor:
    """`MuxExecutor` on the virtual clock: the iteration's duration is the slower phase's predicted time."""

    def __init__(self, model: PerfModel) -> None:
        self.model = model
        self._shapes: dict[int, list[PrefillShape]] = {}

    def start_prefill(self, job: PrefillJob) -> None:
        self._shapes[job.job_id] = [PrefillShape(i.num_new_tokens, i.start) for i in job.batch.items]

    def finish_prefill(self, job: PrefillJob) -> None:
        self._shapes.pop(job.job_id, None)

    def run(self, split: Split, decode: Batch | None, job: PrefillJob | None, layers: int) -> MuxStepResult:
        model = self.model
        result = MuxStepResult()
        both = decode is not None and job is not None and layers > 0
        t_decode = t_prefill = 0.0
        if decode is not None:
            kv = 0
            tokens = result.decode_tokens
            for item in decode.items:
                kv += item.start + 1
                tokens[item.seq.seq_id] = OUTPUT_TOKEN
            t_decode = model.decode_time(decode.num_seqs, kv, split.decode_sms, contended=both)
        if job is not None and layers > 0:
            shapes = self._shapes.get(job.job_id)
            if shapes is None:  # a job started before this executor existed (policy switch)
                self.start_prefill(job)
                shapes = self._shapes[job.job_id]
            t_prefill = model.prefill_layers_time(
                shapes, split.prefill_sms, job.layers_done, layers, contended=both
            )
            if job.layers_done + layers >= job.num_layers:
                tokens = result.prefill_tokens
                for item in job.batch.items:
                    if item.end == item.seq.num_tokens:
                        tokens[item.seq.seq_id] = OUTPUT_TOKEN
        result.elapsed_s = max(t_decode, t_prefill)
        return result

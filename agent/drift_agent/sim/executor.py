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

Sampled tokens: every sampling row gets `OUTPUT_TOKEN` (requests run with `ignore_eos` and a fixed length, so
the value only matters for prefix-cache identity of multi-turn histories, which stays per-session unique because
block hashes chain from the session's own prompt).
"""

from __future__ import annotations

from ..engine.scheduler import Batch
from ..multiplex.mux_loop import decode_step_time, prefill_block_time
from ..multiplex.perf_model import PerfModel, PrefillShape
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

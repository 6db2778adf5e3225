"""The two lanes of a multiplexed engine, shared by the real engine and the simulator.

Prefill and decode run *asynchronously*, each in its own lane on its own SM partition (or thread on CPU): a
decode step and a block of prefill layers are launched independently, and whichever completes first is
post-processed and relaunched while the other keeps running, so neither partition waits for the other (the
bubble-less engine of MuxWise, SGLang's `event_loop_pdmux`). The split only changes at a *sync point*:

- prefill lane busy, decode lane free: the next decode step goes straight onto the current split's decode
  partition (no decision: the prefill holds its SMs, so the split cannot change);
- prefill lane free, decode lane busy: the dispatcher decides; if it keeps the current split, the prefill
  block (or a new prefill) launches at once; if it wants another split, the prefill lane waits for the decode
  step to end (a decision that launches nothing is taken back, so it does not count as a stalled step);
- both free: the dispatcher decides the split and launches both lanes.

The executor is the only thing that differs: the model on a device (`ModelMuxExecutor`), or the performance
model on a virtual clock (the simulator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.scheduler import Batch, Scheduler
from ..core.sequence import Sequence
from ..partition.base import Split
from .dispatcher import DispatchDecision
from .perf_model import PerfModel, PrefillShape
from .policies import MultiplexPolicy, MuxSchedule, PrefillJob


def decode_step_time(perf: PerfModel, split: Split, batch: Batch, contended: bool) -> float:
    """Predicted latency of a decode step launched on `split` (`contended`: the prefill lane is busy); a
    "mixed" one also runs whole prompts folded into it (the dispatcher's folding)."""
    kv = 0
    if batch.phase != "mixed":
        for item in batch.items:
            kv += item.start + 1
        return perf.decode_time(batch.num_seqs, kv, split.decode_sms, contended=contended)
    rows = 0
    chunks: list[PrefillShape] = []
    for item in batch.items:
        if item.num_new_tokens == 1:
            rows += 1
            kv += item.start + 1
        else:
            chunks.append(PrefillShape(item.num_new_tokens, item.start))
    t = perf.mixed_step_time(chunks, rows, kv, split.decode_sms)
    return t * perf.decode_slowdown(split.decode_sms) if contended else t


def prefill_block_time(perf: PerfModel, split: Split, job: PrefillJob, layers: int, contended: bool) -> float:
    """Predicted latency of `layers` layers of `job` from its next layer, on `split` (`contended`: the decode
    lane is busy)."""
    return perf.prefill_layers_time(
        job.shapes, split.prefill_sms, job.layers_done, layers, contended=contended
    )


@dataclass
class LaneLaunch:
    """What `MuxLanes.launch` started: the executor runs these on `split`."""

    split: Split | None = None
    decode: Batch | None = None
    prefill: PrefillJob | None = None
    prefill_layers: int = 0
    new_job: PrefillJob | None = None  # `prefill` is a job started now (the executor prepares its inputs)
    output: MuxSchedule | None = None  # the policy's schedule when it was asked
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def decision(self) -> DispatchDecision | None:
        return self.output.decision if self.output is not None else None

    @property
    def decision_taken(self) -> DispatchDecision | None:
        """The decision, unless it was taken back (deferred to the next sync point)."""
        if self.output is None or self.output.deferred:
            return None
        return self.output.decision

    @property
    def started(self) -> bool:
        return self.decode is not None or self.prefill is not None


class MuxLanes:
    """Which batch each lane is running, and the split they run on. Pure: no clock, no device."""

    def __init__(self, sched: Scheduler) -> None:
        assert isinstance(sched.policy, MultiplexPolicy)
        self.sched = sched
        self.split: Split | None = None
        self.decode: Batch | None = None
        self.prefill: PrefillJob | None = None
        self.prefill_layers = 0

    @property
    def policy(self) -> MultiplexPolicy:
        return self.sched.policy  # type: ignore[return-value]

    @property
    def busy(self) -> bool:
        return self.decode is not None or self.prefill is not None

    def launch(self, now: float) -> LaneLaunch:
        """Start work on the free lanes (see the module docstring)."""
        sched, policy = self.sched, self.policy
        if self.decode is not None and self.prefill is not None:
            return LaneLaunch(split=self.split)
        if self.prefill is not None:  # decode continues on the prefill's split, no decision
            launch = LaneLaunch(split=self.split)
            launch.decode = policy.decode_batch(sched, launch.preempted)
            self.decode = launch.decode
            return launch
        out = policy.schedule(sched, now, decode_busy=self.decode is not None, split=self.split)
        launch = LaneLaunch(output=out, preempted=out.preempted)
        if out.deferred:
            launch.split = self.split
            return launch
        launch.new_job = out.new_prefill_job
        # A new prefill job's batch is not among `out.batches` (it runs on the prefill lane).
        sched.stamp_scheduled(out.batches + [launch.new_job.batch] if launch.new_job else out.batches, now)
        launch.split = Split(*out.split) if out.split else policy.splits[0]
        job = out.prefill_job
        if job is not None:
            launch.prefill, launch.prefill_layers = job, out.prefill_layers
            self.prefill, self.prefill_layers = job, launch.prefill_layers
        if self.decode is None:  # a decode step, with any prompts folded into it
            launch.decode = next((b for b in out.batches if b.phase != "prefill"), None)
            self.decode = launch.decode
        if self.busy:
            self.split = launch.split
        return launch

    def decode_done(self, tokens: Any) -> tuple[Batch, list[Sequence]]:
        """Post the decode step's sampled tokens (`{seq_id: token}`); the sequences it advanced."""
        batch, self.decode = self.decode, None
        assert batch is not None, "no decode step in flight"
        return batch, self.sched.on_batch_done(batch, tokens)

    def prefill_done(self, tokens: Any) -> tuple[PrefillJob, list[Sequence]]:
        """Post a prefill block; when it was the job's last, its sampled tokens (`{seq_id: token}`) and the
        sequences it advanced, which join the decode batch from the next decode launch."""
        job, layers = self.prefill, self.prefill_layers
        assert job is not None, "no prefill block in flight"
        self.prefill, self.prefill_layers = None, 0
        job.layers_done += layers
        if not job.done:
            return job, []
        seqs = self.sched.on_batch_done(job.batch, tokens)
        self.policy.on_job_done(job)
        return job, seqs

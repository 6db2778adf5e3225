"""One iteration of a multiplexed engine, shared by the real engine and the simulator.

schedule -> (maybe) launch a new prefill job -> run the decode step and a block of prefill layers concurrently
on the chosen split -> post-process what completed. The executor is the only thing that differs: the model on
a device, or the performance model on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engine.scheduler import Batch, Scheduler, SchedulerOutput
from ..engine.sequence import Sequence
from ..partition.base import Split
from .policies import MultiplexPolicy, PrefillJob


@dataclass
class MuxStepResult:
    decode_tokens: dict[int, int] = field(default_factory=dict)
    prefill_tokens: dict[int, int] = field(default_factory=dict)  # filled when the job ran its last layer
    logprobs: dict[int, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0  # wall time (engine) or simulated time (simulator)


class MuxExecutor(Protocol):
    def start_prefill(self, job: PrefillJob) -> None: ...

    def run(self, split: Split, decode: Batch | None, job: PrefillJob | None, layers: int) -> MuxStepResult:
        """Run the decode step and `layers` layers of `job` concurrently; sample the job's next tokens when
        those layers complete it."""
        ...

    def finish_prefill(self, job: PrefillJob) -> None: ...


@dataclass
class MuxIteration:
    output: SchedulerOutput
    result: MuxStepResult
    # (batch, sequences it advanced) for each batch that completed in this iteration
    completed: list[tuple[Batch, list[Sequence]]]

    @property
    def made_progress(self) -> bool:
        return bool(self.completed) or bool(self.output.info.get("prefill_layers"))


def run_iteration(sched: Scheduler, executor: MuxExecutor, now: float) -> MuxIteration:
    policy = sched.policy
    assert isinstance(policy, MultiplexPolicy)
    out = sched.schedule(now)
    job: PrefillJob | None = out.info.get("prefill_job")
    layers: int = out.info.get("prefill_layers", 0)
    new_job: PrefillJob | None = out.info.get("new_prefill_job")
    if new_job is not None:
        executor.start_prefill(new_job)
    decode = next((b for b in out.batches if b.phase == "decode"), None)
    completed: list[tuple[Batch, list[Sequence]]] = []
    if decode is None and job is None:
        return MuxIteration(out, MuxStepResult(), completed)
    split = Split(*out.split) if out.split else policy.splits[0]
    result = executor.run(split, decode, job, layers)
    if decode is not None:
        completed.append((decode, sched.on_batch_done(decode, result.decode_tokens)))
    if job is not None:
        job.layers_done += layers
        if job.done:
            completed.append((job.batch, sched.on_batch_done(job.batch, result.prefill_tokens)))
            policy.on_job_done(job)
            executor.finish_prefill(job)
    return MuxIteration(out, result, completed)

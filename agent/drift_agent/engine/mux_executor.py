"""Runs the multiplexed engine's two lanes on the real model: decode steps and prefill layer blocks, launched
independently over the one KV pool, each on its own partition's stream (GPU) or worker thread (CPU, shared
partitioner). `multiplex.mux_loop.MuxLanes` decides what to launch; this module launches it, reports which lane
finished first, and samples its tokens.

Both phases write disjoint KV slots (a prefill owns fresh blocks; prefix-cache blocks are read-only), so the
pool needs no locking. A finished prefill joins the decode batch with no copy: its KV is already in place.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..core.scheduler import Batch
from ..multiplex.policies import PrefillJob
from ..partition.base import Partitioner, Split
from .model_runner import ModelRunner

Lane = Literal["decode", "prefill"]


@dataclass
class _JobState:
    positions: torch.Tensor
    plan: Any  # the model's ForwardPlan, built once per job
    rows: list[int]
    h: torch.Tensor
    residual: torch.Tensor | None


@dataclass
class _InFlight:
    """One lane's launched work: logits come from `future` (CPU) or are on the device once `event` fires."""

    batch: Batch
    started: float
    future: Future | None = None
    event: Any = None  # torch.cuda.Event
    logits: torch.Tensor | None = None


@dataclass
class LaneResult:
    tokens: dict[int, int]
    logprobs: dict[int, Any]
    elapsed_s: float  # launch to completion, as seen by the polling host


class ModelMuxExecutor:
    def __init__(self, runner: ModelRunner, partitioner: Partitioner) -> None:
        self.runner = runner
        self.model = runner.model
        self.partitioner = partitioner
        self.jobs: dict[int, _JobState] = {}
        self.on_cuda = runner.device.type == "cuda"
        # CPU: one worker thread per lane (torch releases the GIL inside kernels, so the two overlap).
        self._pool = None if self.on_cuda else ThreadPoolExecutor(2, thread_name_prefix="drift-lane")
        self.lanes: dict[Lane, _InFlight] = {}
        graphs = getattr(runner, "graphs", None)
        if graphs is not None and self.on_cuda:
            # Decode graphs per partition (its stream), captured now rather than by the first steps.
            for split in partitioner.splits:
                graphs.capture_all(partitioner.streams_for(split)[1])

    @torch.inference_mode()
    def start_prefill(self, job: PrefillJob) -> None:
        input_ids, positions, meta, rows = self.runner.prepare(job.batch)
        plan = self.model.prepare(positions, meta)
        h, residual = self.model.embed(input_ids)
        self.jobs[job.job_id] = _JobState(positions, plan, rows, h, residual)

    def finish_prefill(self, job: PrefillJob) -> None:
        self.jobs.pop(job.job_id, None)

    @torch.inference_mode()
    def _prefill_block(self, job: PrefillJob, start: int, layers: int) -> torch.Tensor | None:
        """Run `layers` layers from `start`; the sampling rows' logits when the job is then complete."""
        st = self.jobs[job.job_id]
        st.h, st.residual = self.model.forward_layers(
            st.h, st.residual, st.positions, st.plan, start, start + layers
        )
        if start + layers < job.num_layers:
            return None
        hidden = self.model.finalize(st.h, st.residual)
        return self.model.compute_logits(hidden[st.rows])

    @torch.inference_mode()
    def _decode_step(self, batch: Batch) -> torch.Tensor:
        return self.runner.forward_logits(batch)

    # ---- launching ---------------------------------------------------------------------------------------
    def launch_decode(self, split: Split, batch: Batch) -> None:
        self._launch("decode", split, batch, self._decode_step, batch)

    def launch_prefill(self, split: Split, job: PrefillJob, layers: int) -> None:
        # `job.layers_done` advances when the block is posted, so pass the start layer now.
        self._launch("prefill", split, job.batch, self._prefill_block, job, job.layers_done, layers)

    def _launch(self, lane: Lane, split: Split, batch: Batch, fn: Any, *args: Any) -> None:
        assert lane not in self.lanes, f"{lane} lane is busy"
        flight = _InFlight(batch, time.perf_counter())
        if self._pool is not None:
            flight.future = self._pool.submit(fn, *args)
        else:
            prefill_stream, decode_stream = self.partitioner.streams_for(split)
            current = torch.cuda.current_stream()
            stream = (prefill_stream if lane == "prefill" else decode_stream) or current
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                flight.logits = fn(*args)
                flight.event = torch.cuda.Event()
                flight.event.record(stream)
        self.lanes[lane] = flight

    # ---- completion --------------------------------------------------------------------------------------
    def _ready(self, flight: _InFlight) -> bool:
        return flight.future.done() if flight.future is not None else bool(flight.event.query())

    def wait(self) -> list[Lane]:
        """Block until at least one launched lane has finished; the finished lanes, decode first."""
        if not self.lanes:
            return []
        if self._pool is not None:
            wait([f.future for f in self.lanes.values()], return_when=FIRST_COMPLETED)
        else:
            # Poll instead of blocking in the driver: either lane may finish first.
            while not any(self._ready(f) for f in self.lanes.values()):
                time.sleep(0)
        return [
            lane for lane in ("decode", "prefill") if lane in self.lanes and self._ready(self.lanes[lane])
        ]

    @torch.inference_mode()
    def collect(self, lane: Lane) -> LaneResult:
        """The finished lane's sampled tokens (`{seq_id: token}`; none for a prefill block that did not
        complete its job) and timing."""
        flight = self.lanes.pop(lane)
        elapsed = time.perf_counter() - flight.started
        if flight.future is not None:
            logits = flight.future.result()
        else:
            torch.cuda.current_stream().wait_event(flight.event)
            logits = flight.logits
        if logits is None:
            return LaneResult({}, {}, elapsed)
        step = self.runner.sample(flight.batch, logits)
        return LaneResult(step.tokens, step.logprobs, elapsed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

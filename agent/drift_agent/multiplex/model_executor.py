"""Runs multiplexed iterations on the real model: prefill layer blocks and decode steps concurrently over the
one KV pool, each on its own partition's stream (GPU) or thread (CPU, shared partitioner).

Both phases write disjoint KV slots (a prefill owns fresh blocks; prefix-cache blocks are read-only), so the
pool needs no locking. A finished prefill joins the decode batch with no copy: its KV is already in place.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.model_runner import ModelRunner
from ..engine.scheduler import Batch
from ..partition.base import Partitioner, Split
from .mux_loop import MuxStepResult
from .policies import PrefillJob


@dataclass
class _JobState:
    positions: torch.Tensor
    plan: Any  # the model's ForwardPlan, built once per job
    rows: list[int]
    h: torch.Tensor
    residual: torch.Tensor | None


class ModelMuxExecutor:
    def __init__(self, runner: ModelRunner, partitioner: Partitioner) -> None:
        self.runner = runner
        self.model = runner.model
        self.partitioner = partitioner
        self.jobs: dict[int, _JobState] = {}
        self.on_cuda = runner.device.type == "cuda"
        # CPU: the prefill block runs on a worker thread while the decode step runs on the caller's thread
        # (torch releases the GIL inside kernels, so the two really overlap).
        self._pool = None if self.on_cuda else ThreadPoolExecutor(1, thread_name_prefix="drift-prefill")

    @torch.inference_mode()
    def start_prefill(self, job: PrefillJob) -> None:
        input_ids, positions, meta, rows = self.runner.prepare(job.batch)
        plan = self.model.prepare(positions, meta)
        h, residual = self.model.embed(input_ids)
        self.jobs[job.job_id] = _JobState(positions, plan, rows, h, residual)

    def finish_prefill(self, job: PrefillJob) -> None:
        self.jobs.pop(job.job_id, None)

    @torch.inference_mode()
    def _prefill_block(self, job: PrefillJob, layers: int) -> torch.Tensor | None:
        """Run `layers` layers; returns the sampling rows' logits when the job is complete."""
        st = self.jobs[job.job_id]
        start = job.layers_done
        st.h, st.residual = self.model.forward_layers(
            st.h, st.residual, st.positions, st.plan, start, start + layers
        )
        if start + layers < job.num_layers:
            return None
        hidden = self.model.finalize(st.h, st.residual)
        return self.model.compute_logits(hidden[st.rows])

    def _sample(
        self, batch: Batch, logits: torch.Tensor, result: MuxStepResult, into: dict[int, int]
    ) -> None:
        step = self.runner.sample(batch, logits)
        into.update(step.tokens)
        result.logprobs.update(step.logprobs)

    @torch.inference_mode()
    def run(self, split: Split, decode: Batch | None, job: PrefillJob | None, layers: int) -> MuxStepResult:
        t0 = time.perf_counter()
        result = MuxStepResult()
        if self.on_cuda:
            self._run_cuda(split, decode, job, layers, result)
        else:
            future = (
                self._pool.submit(self._prefill_block, job, layers) if job is not None and layers else None
            )
            if decode is not None:
                self._sample(decode, self.runner.forward_logits(decode), result, result.decode_tokens)
            if future is not None:
                logits = future.result()
                if logits is not None:
                    self._sample(job.batch, logits, result, result.prefill_tokens)
        result.elapsed_s = time.perf_counter() - t0
        return result

    def _run_cuda(
        self, split: Split, decode: Batch | None, job: PrefillJob | None, layers: int, result: MuxStepResult
    ) -> None:
        prefill_stream, decode_stream = self.partitioner.streams_for(split)
        current = torch.cuda.current_stream()
        prefill_logits = None
        done = None
        if job is not None and layers:
            # Launch the prefill block first so it is queued on its SMs before decode starts.
            stream = prefill_stream or current
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                prefill_logits = self._prefill_block(job, layers)
                done = torch.cuda.Event()
                done.record(stream)
        if decode is not None:
            stream = decode_stream or current
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                self._sample(decode, self.runner.forward_logits(decode), result, result.decode_tokens)
        if done is not None:
            # Poll instead of blocking in the driver, so the Python thread stays responsive.
            while not done.query():
                time.sleep(0)
            current.wait_event(done)
            if prefill_logits is not None:
                self._sample(job.batch, prefill_logits, result, result.prefill_tokens)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

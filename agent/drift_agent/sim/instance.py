"""One simulated engine instance: the engine's own Scheduler, BlockManager and policy, on a virtual clock.

The instance never reads a clock. The cluster's event loop calls `start_step(now)`, which asks the policy for
the next step exactly as the engine does and returns when that step ends (its latency from the performance
model); at that time the loop calls `complete_step(now)`, which posts the step's tokens back to the scheduler
(`Scheduler.on_batch_done`) and reports which sequences advanced.

Multiplexed policies run through `multiplex.mux_loop.MuxLanes`, the lane logic the engine's loop uses, with
`SimMuxExecutor` costing each launch. A step here ends when the *first* busy lane completes: `complete_step`
posts that lane, and `start_step` relaunches the free lanes while the other one keeps running, as the engine
does when it polls its lanes.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Any, Literal

import numpy as np

from ..core.block_manager import BlockManager
from ..core.config import POLICIES, EngineConfig, PartitionConfig
from ..core.scheduler import Batch, Policy, Scheduler, SchedulerConfig
from ..core.sequence import Sequence, SequenceStatus
from ..multiplex.mux_loop import LaneLaunch, MuxLanes
from ..multiplex.perf_model import PerfModel
from ..multiplex.policies import MuxContext, make_policy
from ..partition.base import Split
from .executor import ALL_SAMPLED, OUTPUT_TOKEN, Sampled, SimExecutor, SimMuxExecutor, device_model

Role = Literal["both", "prefill", "decode"]


@dataclass(frozen=True)
class InstanceConfig:
    """The engine settings that matter to scheduling (names as in `EngineConfig`)."""

    policy: str = "chunked"
    block_size: int = 16
    num_kv_blocks: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    enable_prefix_caching: bool = False
    prefill_sm_share: float = 0.5  # static-split's prefill share
    fold_max_tokens: int = 2048  # drift: prompt tokens folded into a decode step at most (dispatcher rule 8)
    tpot_margin: float = 0.0  # drift: decode plans against step budget / (1 + margin) (dispatcher rule 0)
    # The device takes this many times the performance model's latency (1: the model is exact); the policies
    # and router still predict with the model (see `executor.ScaledDevice`).
    model_error: float = 1.0
    slo_ttft_ms: float = 1000.0  # defaults for requests without their own targets
    slo_tpot_ms: float = 100.0
    fast_forward: bool = True  # apply runs of identical decode steps at once (exact; see `SimInstance`)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if min(self.block_size, self.num_kv_blocks, self.max_num_seqs, self.max_num_batched_tokens) < 1:
            raise ValueError("block size, KV blocks, max seqs and the token budget must be positive")
        if self.fold_max_tokens < 0:
            raise ValueError(f"fold_max_tokens must be >= 0, got {self.fold_max_tokens}")
        if not -0.5 <= self.tpot_margin <= 1.0:  # `PartitionConfig.tpot_margin`'s range
            raise ValueError(f"tpot_margin must be in [-0.5, 1], got {self.tpot_margin}")
        if not self.model_error > 0:
            raise ValueError(f"model_error must be positive, got {self.model_error}")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            policy=self.policy,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            partition=PartitionConfig(
                mode="auto",
                prefill_sm_share=self.prefill_sm_share,
                fold_max_tokens=self.fold_max_tokens,
                tpot_margin=self.tpot_margin,
            ),
            slo_ttft_ms=self.slo_ttft_ms,
            slo_tpot_ms=self.slo_tpot_ms,
        )


def make_instance_policy(config: InstanceConfig, perf: PerfModel, splits: list[Split]) -> Policy:
    """The engine's policy for this instance (`multiplex.policies.make_policy`) over the simulated model."""
    return make_policy(
        config.policy,
        config.engine_config(),
        lambda: MuxContext(
            perf_model=perf,
            splits=splits,
            num_layers=perf.num_layers,
            default_ttft_s=config.slo_ttft_ms / 1e3,
            default_tpot_s=config.slo_tpot_ms / 1e3,
        ),
    )


_SHORT_RUN = 4  # decode steps costed one call each; longer runs are costed as one array


def decode_run(
    after: list[tuple[int, int]],
    start: float,
    horizon: float,
    stop_at_first_finish: bool,
    perf: PerfModel,
    sms: int,
    contended: bool = False,
) -> array:
    """Latencies of the decode steps that follow one just run, for those starting before `horizon`: every
    sequence with tokens left takes part in each step. `after`: (tokens left, context of the next step) per
    sequence. Stops when none is left, or at the first finish when `stop_at_first_finish`.

    Between two finishes the batch is fixed and its context grows by one token per sequence a step, so such a
    run is costed with one `PerfModel.decode_times` call (the same floats as a call per step; a test checks it)
    and its start times are one running sum, as the step-by-step loop adds them."""
    order = sorted(after)
    n = len(order)
    kv = sum(map(itemgetter(1), order))
    gone = 0  # sequences finished so far (a prefix of `order`)
    durations = array("d")
    t = start
    step = 0
    while t < horizon:
        while gone < len(order) and order[gone][0] <= step:
            kv -= order[gone][1] + step
            n -= 1
            gone += 1
        if n == 0 or (stop_at_first_finish and gone):
            break
        run = order[gone][0] - step  # steps before the next finish
        d = perf.decode_time(n, kv, sms, contended=contended)
        if run > _SHORT_RUN and math.isfinite(horizon) and d > 0:
            # Steps get longer as contexts grow, so no more than this start before the horizon (were a model
            # to disagree, the loop just costs the rest in the next round).
            run = min(run, int((horizon - t) / d) + 1)
        if run <= _SHORT_RUN:
            durations.append(d)
            t += d
            kv += n
            step += 1
            continue
        ds = perf.decode_times(n, np.arange(kv, kv + n * run, n), sms, contended=contended)
        starts = np.cumsum(np.concatenate(([t], ds)))  # starts[j]: when step j starts; starts[run]: the end
        k = int(np.searchsorted(starts[:run], horizon))  # the steps that start before the horizon
        durations.frombytes(ds[:k].tobytes())
        t = float(starts[k])
        kv += n * k
        step += k
    return durations


@dataclass(slots=True)
class Span:
    """Steps fast-forwarded together: a first step as scheduled, then decode steps. Each sequence gets one token
    per step until it reaches its length."""

    seqs: list[Sequence]
    # Per sequence, (tokens left after the first step, context of the second step): the context is one past the
    # end of the first step's chunk, which is the sequence's first sampled position.
    after: list[tuple[int, int]]
    durations: array  # latency of each step
    ends: list[float]  # end time of each step
    posted: int = 0  # steps already posted (a span beside prefill blocks is posted up to each block's end)
    # The step each sequence joins at (None: all at the first). A joiner's `after` entry is written as if it had
    # been there from the first step: (tokens left before its first step + start - 1, context there - start + 1).
    starts: list[int] | None = None


class SimInstance:
    def __init__(
        self,
        index: int,
        config: InstanceConfig,
        perf: PerfModel,
        splits: list[Split],
        role: Role = "both",
    ) -> None:
        self.index = index
        self.config = config
        self.role = role
        self.perf = perf  # what the policy and the router predict with
        self.device = device_model(perf, config.model_error)  # what steps take on the virtual clock
        self.bm = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
        )
        self.policy = make_instance_policy(config, perf, splits)
        self.sched = Scheduler(sched_cfg, self.bm, self.policy)
        self.multiplexing = bool(getattr(self.policy, "multiplexing", False))
        self.executor: Any = SimMuxExecutor(self.device) if self.multiplexing else SimExecutor(self.device)
        self.fast_forward = config.fast_forward
        # Spans hold only steps that end before the horizon, so that what the cluster reads there (KV usage,
        # queued prompt tokens) is what stepping would show; otherwise steps that start before it.
        self.sync_at_horizon = False
        self.span: Span | None = None
        self.busy = False
        self.step_end = 0.0
        self.wake_pending = False
        self._finish_is_event = False
        self._batch: Batch | None = None
        self._sampled: Sampled | None = None
        # Multiplexed: the two lanes and when each completes.
        self.lanes = MuxLanes(self.sched) if self.multiplexing else None
        self._decode_end: float | None = None
        self._prefill_end: float | None = None
        self._prefill_sampled: Sampled | None = None
        # A span beside prefill blocks: its split, the length it may be cut back to when a block ended inside
        # it (set until the lanes have decided), and whether that block finished its job.
        self._span_split: tuple[int, int] | None = None
        self._span_cut: int | None = None
        self._job_finished = False
        # What `complete_step` posted from `self.span`: its first `span_advanced` sequences, from step `span_from`.
        self.span_advanced = 0
        self.span_from = 0
        # Router load signal: prompt tokens added here whose first token has not come out yet.
        self.pending_prefill_tokens = 0
        self.num_steps = 0
        self.num_fast_forwarded = 0  # steps applied in spans without asking the policy
        self.num_requests = 0
        self.busy_time = 0.0
        self.splits_used: dict[tuple[int, int], int] = {}
        self.decisions: dict[str, int] = {}  # dispatcher decisions acted on, by mode (as the engine counts)

    # ---- load signals ----------------------------------------------------------------------------------
    @property
    def kv_usage(self) -> float:
        return self.bm.usage

    @property
    def kv_used_tokens(self) -> int:
        return (self.bm.num_blocks - self.bm.num_free_blocks) * self.bm.block_size

    @property
    def load_tokens(self) -> int:
        """Work queued and held: prompt tokens still to prefill plus KV tokens of running requests."""
        return self.pending_prefill_tokens + self.kv_used_tokens

    # ---- requests ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request (raises `PromptTooLongError` if it can never run here)."""
        self.sched.add(seq)
        self.pending_prefill_tokens += seq.num_prompt_tokens
        self.num_requests += 1

    def adopt_running(self, seq: Sequence) -> bool:
        """Take over a sequence whose KV was computed elsewhere (a migration's commit): allocate its blocks
        and put it among the running. False, changing nothing, if the pool cannot hold it."""
        if len(self.sched.running) >= self.config.max_num_seqs:
            return False
        seq.block_table = []
        seq.num_registered_blocks = 0
        if not self.bm.allocate(seq, 0):
            return False
        seq.status = SequenceStatus.RUNNING
        self.sched.running.append(seq)
        return True

    def release_running(self, seq: Sequence) -> None:
        """Remove a running, not in-flight sequence without finishing it (it continues on another instance)."""
        assert not seq.in_flight and seq.status is SequenceStatus.RUNNING
        self.sched.running.remove(seq)
        self.bm.free_seq(seq)

    # ---- stepping ----------------------------------------------------------------------------------------
    def start_step(
        self, now: float, horizon: float = math.inf, finish_is_event: bool = False
    ) -> float | None:
        """Schedule and launch the next step at `now`; its end time, or None when there is nothing to run.

        `horizon`: the time of the next event that could change this instance's view (see `Cluster`).
        Decode-only steps that start before it may be fast-forwarded as one span (see `_try_span`);
        `finish_is_event`: a request's finish can create work (sessions, a concurrency cap), so spans stop at
        the first one."""
        assert not self.busy
        if not self.sched.has_unfinished:
            return None
        if self.lanes is None or self.lanes.decode is None:
            self.span = None  # (a span beside prefill blocks runs on while its decode lane is busy)
        self._finish_is_event = finish_is_event
        end = self._start_mux(now, horizon) if self.multiplexing else self._start_sequential(now, horizon)
        if end is None:
            return None
        self.busy = True
        self.busy_time += end - now
        self.step_end = end
        return end

    def _count_steps(self, steps: int) -> None:
        """`steps` launched at once: one, or a span's (all but the first fast-forwarded)."""
        self.num_steps += steps
        self.num_fast_forwarded += steps - 1

    def _start_sequential(self, now: float, horizon: float) -> float | None:
        """Schedule and launch one batch on the whole device; when it (or its span) ends."""
        out = self.sched.schedule(now)
        if not out.batches:
            return None
        batch = out.batches[0]
        dt, sampled = self.executor.batch(batch)
        self._batch, self._sampled = batch, sampled
        end = now + dt
        # A span may start with any step of every running sequence in which each samples (decodes, and prompts
        # whose last chunk runs): afterwards all of them decode. A prompt cut short would prefill again.
        if self.fast_forward and end < horizon and not out.preempted and not sampled.skip:
            sched = self.sched
            if batch.num_seqs == len(sched.running) and batch.num_seqs <= self.config.max_num_batched_tokens:
                self.span = self._try_span(batch, now, dt, horizon, self.device.total_sms)
        if self.span is not None:
            end = self.span.ends[-1]
        self._count_steps(len(self.span.durations) if self.span is not None else 1)
        return end

    def _try_span(
        self,
        batch: Batch,
        now: float,
        dt: float,
        horizon: float,
        decode_sms: int,
        beside_prefill: bool = False,
    ) -> Span | None:
        """Fast-forward a run of decode steps after `batch`, a step of every running sequence just scheduled
        (its KV slots allocated, its tokens not posted) in which every sequence samples: a decode step, or a
        sequential policy's step that also runs the last chunk of some prompts. With nothing waiting (or
        nothing admissible: all sequence slots taken) and no prefill left, until the next event that could add
        work (`horizon`) and while the KV pool holds every sequence's growth, the policy would schedule a
        decode step of all of them each time, minus the sequences that reach their length (decode all; no
        prefill, no preemption, the same split). So those steps are applied at once, each step's latency from the
        performance model for the sequences still running in it. Exact: a test compares every token time
        with step-by-step simulation, prefix caching included (blocks are popped from the free list's head,
        so a span takes the same blocks, and frees them in the same order, as the steps it replaces).

        Multiplexed, `beside_prefill`: the steps run beside prefill layer blocks, contended. While a block
        runs the lanes relaunch the decode step with no decision (the queue does not matter), so the span may
        run past the block's end: there the steps that ended are posted, the lanes decide, and the span goes
        on only if the decision keeps the decode steps as they are (see `_complete_lanes`, `_continue_span`)."""
        contended = False
        if not beside_prefill:
            # Requests waiting while every sequence slot is taken cannot be admitted until one finishes: the
            # span then ends at the first finish (the next step may admit).
            blocked = bool(self.sched.waiting)
            if blocked and batch.num_seqs < self.config.max_num_seqs:
                return None
            stop = blocked or self._finish_is_event
        else:
            stop = self._finish_is_event
            contended = True
        items = batch.items
        seqs = [i.seq for i in items]
        # After the first step, sequence s has (left - 1) tokens to go, and the second step's context is
        # one past the first's chunk (its sampled token's position, plus that token).
        after = [
            (s.max_tokens - (len(s.token_ids) - s.num_prompt_tokens) - 1, i.start + i.num_new_tokens + 1)
            for s, i in zip(seqs, items, strict=True)
        ]
        further = self._run_from(after, now + dt, horizon, stop, decode_sms, contended)
        if not further and not beside_prefill:
            return None
        k = len(
            further
        )  # steps after the first (none: the job's prompts may join after it, see `_join_span`)
        if not self._span_kv_ok(seqs, after, k):
            return None
        durations = array("d", [dt])
        durations.extend(further)
        return Span(seqs, after, durations, list(accumulate(durations, initial=now))[1:])

    def _run_from(
        self,
        after: list[tuple[int, int]],
        start: float,
        horizon: float,
        stop: bool,
        sms: int,
        contended: bool,
    ) -> array:
        """`decode_run` from `start`; with `sync_at_horizon`, only the steps that end before the horizon."""
        run = decode_run(after, start, horizon, stop, self.device, sms, contended)
        if self.sync_at_horizon:
            end = start
            for i, d in enumerate(run):
                end += d
                if end >= horizon:
                    del run[i:]
                    break
        return run

    def _span_kv_ok(self, seqs: list[Sequence], after: list[tuple[int, int]], k: int) -> bool:
        """Whether the free pool holds the blocks the running ones of `seqs` need for `k` decode steps after a
        span's first. The first step's chunk fits its blocks, so k more tokens need at most ceil(k / block
        size) more blocks a sequence: only a pool short of that bound is worth counting exactly."""
        roomy = len(seqs) * -(-k // self.bm.block_size) <= self.bm.num_free_blocks
        return roomy or self._span_fits_kv(seqs, after, k)

    def _span_fits_kv(self, seqs: list[Sequence], after: list[tuple[int, int]], k: int) -> bool:
        """`_span_kv_ok`, counted block by block (a sequence stops at its length)."""
        bm = self.bm
        need = 0
        finished = SequenceStatus.FINISHED
        for seq, (left, context) in zip(seqs, after, strict=True):
            if left > 0 and seq.status is not finished:  # the first chunk ends at context - 1
                need += bm.blocks_needed(context - 1 + min(left, k)) - len(seq.block_table)
        return need <= bm.num_free_blocks

    def _post_span(self, span: Span, upto: int) -> list[Sequence]:
        """Post the span's steps from `span.posted` up to `upto`: sequence s gets one token per step until it
        reaches its length (what the rounds of `on_batch_done` would do); finished ones retire in the order they
        finished. Short of the span's end, step `upto` is in flight: its sequences stay in flight and hold its KV
        slots, allocated as its launch would have. Returns the span's sequences for the caller to stamp (none
        when no step ended)."""
        sched, bm = self.sched, self.bm
        done, span.posted = span.posted, upto
        whole = upto == len(span.durations)
        if upto == done and not whole:
            return []  # no step ended since the last posting; the one in flight has its slots already
        block_size = bm.block_size
        register = bm.register_full_blocks if bm.enable_prefix_caching else None
        finished_status = SequenceStatus.FINISHED
        finished: list[tuple[int, int, Sequence]] = []
        starts = span.starts
        for pos, (seq, (rest, context)) in enumerate(zip(span.seqs, span.after, strict=True)):
            if seq.status is finished_status:
                seq.in_flight = False
                continue
            first = done if starts is None or starts[pos] <= done else starts[pos]
            last = rest + 1 if rest + 1 < upto else upto  # it runs in steps [start, rest + 1)
            if last <= first:
                if whole:
                    seq.in_flight = False
                continue
            # The policy allocated the first step's slots, up to its chunk's end (context - 1); after step j
            # the sequence has computed up to position end + j - 1, and a step in flight one more.
            computed = context - 2 + last
            ending = last == rest + 1
            slots = computed if whole or ending else computed + 1
            if slots > len(seq.block_table) * block_size:
                ok = bm.allocate(seq, slots - seq.num_computed_tokens)
                assert ok, "span KV was checked when it started"
            seq.num_computed_tokens = computed
            seq.token_ids += [OUTPUT_TOKEN] * (last - first)
            if register is not None:
                register(seq)
            if whole or ending:
                seq.in_flight = False
            # Only the length can end a sequence inside a span (simulated requests ignore EOS, have no stop
            # tokens); `check_stop_token` still decides, and records the reason.
            if ending and seq.check_stop_token():
                finished.append((last, pos, seq))
        for _, _, seq in sorted(finished, key=lambda f: (f[0], f[1])):
            sched.finish(seq, seq.finish_reason)  # type: ignore[arg-type]
        return span.seqs

    def _cut_span(self, steps: int) -> None:
        """End the running span after its first `steps` steps (the rest would have been stepped)."""
        span = self.span
        assert span is not None and span.posted < steps
        extra = len(span.durations) - steps
        if extra <= 0:
            return
        del span.durations[steps:]
        del span.ends[steps:]
        self._decode_end = span.ends[-1]
        self.num_steps -= extra
        self.num_fast_forwarded -= extra
        if self._span_split is not None:
            self.splits_used[self._span_split] -= extra

    def _start_mux(self, now: float, horizon: float) -> float | None:
        """Launch on the free lanes (`MuxLanes.launch`, as the engine does); when the next lane completes, or
        None when neither lane has work."""
        lanes, executor = self.lanes, self.executor
        launch = lanes.launch(now)
        split = launch.split
        decision = launch.decision_taken
        if decision is not None:
            self.decisions[decision.mode] = self.decisions.get(decision.mode, 0) + 1
        if launch.prefill is not None and launch.prefill_layers > 0:
            assert split is not None
            dt, self._prefill_sampled = executor.prefill(
                split, launch.prefill, launch.prefill_layers, contended=lanes.decode is not None
            )
            self._prefill_end = now + dt
            self._count_steps(1)
        if self._span_cut is not None:
            self._continue_span(launch, horizon)
        if launch.decode is not None:
            assert split is not None
            dt = executor.decode(split, launch.decode, contended=lanes.prefill is not None)
            self._decode_end = now + dt
            steps = 1
            key = (split.prefill_sms, split.decode_sms)
            if self.fast_forward and now + dt < horizon:
                span = self._try_mux_span(launch, now, dt, horizon)
                if span is not None:
                    self.span, self._span_split = span, key
                    steps = len(span.durations)
                    self._decode_end = span.ends[-1]
            self._count_steps(steps)
            self.splits_used[key] = self.splits_used.get(key, 0) + steps
        if not lanes.busy:
            return None
        return min(e for e in (self._decode_end, self._prefill_end) if e is not None)

    def _try_mux_span(self, launch: LaneLaunch, now: float, dt: float, horizon: float) -> Span | None:
        """A span of decode steps: beside a prefill block in flight, until the job's predicted end (the lanes
        relaunch decode without a decision; each block's end may cut the span, see `_continue_span`); or from
        a decode-only launch with no prefill job in flight, paused or starting, while the dispatcher would
        decide the same again (decode alone, same split) at each step end until something can start a
        prefill."""
        policy, sched, lanes = self.policy, self.sched, self.lanes
        batch, split = launch.decode, launch.split
        assert batch is not None and split is not None and lanes is not None
        job = lanes.prefill
        if job is not None:
            assert self._prefill_end is not None
            if launch.preempted:
                return None
            # Up to the step in flight when the job's last block ends: its prompts join the steps after that
            # (`_join_span`, where the decision there is predictable).
            done = job.layers_done + lanes.prefill_layers
            job_end = self._prefill_end
            if done < job.num_layers:
                job_end += self.device.prefill_layers_time(
                    job.shapes, split.prefill_sms, done, job.num_layers - done, contended=True
                )
            return self._try_span(
                batch, now, dt, min(horizon, job_end), split.decode_sms, beside_prefill=True
            )
        decision = launch.decision
        if decision is None or decision.mode not in ("decode-only", "fold", "static") or launch.preempted:
            return None
        if policy.active is not None or policy.paused is not None or launch.new_job is not None:
            return None
        if batch.num_seqs != len(sched.running):
            return None
        return self._try_span(batch, now, dt, horizon, split.decode_sms)

    def _continue_span(self, launch: LaneLaunch, horizon: float) -> None:
        """A prefill block ended inside the running span, which `_complete_lanes` posted up to the step in
        flight, and the lanes have decided. The span's later steps stand only if the prefill lane runs the next
        block beside them (so the lanes relaunch decode with no decision, contended), no job finished (its
        prompts would join the next decode launch), nothing was preempted, the pool still holds their KV after
        any admission, and they start before the next event; otherwise it ends with the step in flight, and
        where the block finished its job, the job's sequences may join it after that step (`_join_span`)."""
        span = self.span
        cut, self._span_cut = self._span_cut, None
        assert span is not None and cut is not None
        steps = len(span.durations)
        ok = (
            launch.prefill is not None
            and launch.prefill_layers > 0
            and not launch.preempted
            and not self._job_finished
            and (launch.new_job is None or self._span_kv_ok(span.seqs, span.after, steps - 1))
        )
        if ok:
            # Step i > 0 starts when step i - 1 ends.
            before = bisect_left(span.ends, horizon) + (0 if self.sync_at_horizon else 1)
            self._cut_span(max(cut, min(steps, before)))
            return
        self._cut_span(cut)
        if self._job_finished and launch.prefill is None and not launch.preempted:
            self._join_span(horizon)

    def _join_span(self, horizon: float) -> None:
        """The job that just finished leaves the prefill lane idle; after the decode step in flight the lanes
        decide again, and with nothing waiting and no other job that decision is the decode step of every running
        sequence, uncontended, on the split for decode alone (`Dispatcher.decode_alone_split`): the span's
        sequences and those of the jobs that finished while it ran. Those steps are appended to the span (up to
        the next event, as any span), the jobs' sequences joining it at the first of them."""
        span, policy = self.span, self.policy
        assert span is not None
        if (
            self.sched.waiting
            or policy.active is not None
            or policy.paused is not None
            or policy.dispatcher.prefill_stall_steps  # (the decision would reset rule 6's count)
        ):
            return
        j = len(span.durations)  # the joiners' first step
        start = span.ends[-1]
        if start >= horizon:
            return
        # Every running sequence outside the span decodes now (no job is left): the jobs that finished inside
        # it. They must be the newest, as the next decode batch orders sequences by age.
        joiners: list[Sequence] = []
        for s in self.sched.running:
            if not s.in_flight:
                joiners.append(s)
            elif joiners:
                return
        finished = SequenceStatus.FINISHED
        # Each sequence's (tokens left, context) at step j, for the run of steps from there.
        seqs = [s for s in span.seqs if s.status is not finished]
        after = [
            (rest - j + 1, context + j - 1)
            for s, (rest, context) in zip(span.seqs, span.after, strict=True)
            if s.status is not finished
        ]
        seqs += joiners
        after += [
            (s.max_tokens - (len(s.token_ids) - s.num_prompt_tokens), len(s.token_ids)) for s in joiners
        ]
        split = policy.dispatcher.decode_alone_split(policy.splits)
        run = self._run_from(after, start, horizon, self._finish_is_event, split.decode_sms, False)
        if not run or not self._span_kv_ok(seqs, after, len(run)):
            return
        for s in joiners:
            s.in_flight = True  # scheduled for the span's steps from j
        span.seqs += joiners
        span.after += [
            (left + j - 1, context - j + 1) for left, context in after[len(after) - len(joiners) :]
        ]
        span.starts = (span.starts or [0] * (len(span.seqs) - len(joiners))) + [j] * len(joiners)
        span.durations.extend(run)
        span.ends += list(accumulate(run, initial=start))[1:]
        self._decode_end = span.ends[-1]
        self.num_steps += len(run)
        self.num_fast_forwarded += len(run)
        key = (split.prefill_sms, split.decode_sms)
        self.splits_used[key] = self.splits_used.get(key, 0) + len(run)
        self._span_split = key  # (a joined span is never cut: no prefill block ends inside it)
        assert self.lanes is not None
        self.lanes.split = split  # as the decision after the step in flight sets it

    def complete_step(self, now: float) -> list[Sequence]:
        """End the running step at `now`: the sequences it advanced (token appended, prompt progressed or
        finished), for the caller to stamp with `now`. After a span's steps, the first `span_advanced` of them
        were posted by `self.span`, from its step `span_from`: the caller reads their token times there."""
        assert self.busy
        self.busy = False
        self.span_advanced = 0
        if self.multiplexing:
            return self._complete_lanes(now)
        batch, sampled = self._batch, self._sampled
        self._batch = self._sampled = None
        assert batch is not None
        span = self.span
        if span is not None:
            self.span_from = 0
            advanced = self._post_span(span, len(span.durations))
            self.span_advanced = len(advanced)
            return advanced
        return self.sched.on_batch_done(batch, sampled)  # type: ignore[arg-type]

    def _complete_lanes(self, now: float) -> list[Sequence]:
        """Post the lanes that complete at `now` (decode first when both do, as the engine polls them). A
        prefill block that ends inside a decode span posts the span's steps that ended before it."""
        lanes = self.lanes
        assert lanes is not None
        advanced: list[Sequence] = []
        span = self.span
        decode_done = self._decode_end is not None and self._decode_end <= now
        prefill_done = self._prefill_end is not None and self._prefill_end <= now
        if span is not None:
            self.span_from = span.posted
            if prefill_done and not decode_done:
                upto = bisect_right(span.ends, now, lo=span.posted)  # steps that have ended
                if upto > span.posted and span.ends[upto - 1] == now:
                    self._cut_span(upto)  # the decode step ends now too: both lanes sync, as when stepping
                    decode_done = True
                else:
                    advanced = self._post_span(span, upto)
                    self._span_cut = upto + 1  # the lanes decide beside step `upto`
        if decode_done:
            self._decode_end = None
            if span is not None:
                lanes.decode = None  # posted by the span, step by step
                advanced = self._post_span(span, len(span.durations))
            else:
                _, advanced = lanes.decode_done(ALL_SAMPLED)
        if span is not None:
            self.span_advanced = len(advanced)
        if prefill_done:
            self._prefill_end = None
            job, seqs = lanes.prefill_done(self._prefill_sampled)
            self._job_finished = job.done
            advanced = advanced + seqs
        return advanced

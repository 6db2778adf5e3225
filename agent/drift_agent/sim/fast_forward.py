"""Fast-forward: runs of decode steps the policy would schedule identically, applied at once (spans), exactly.

An instance (`instance.SimInstance`) asks its policy for every step. Where the next steps are known without
asking (a decode step of every running sequence, again and again, until the next event that could add work,
a finish that could, or a shortage of KV), `FastForward` applies them as one `Span`: each step's latency from
the device model (`decode_run`: one array call per run of steps between two finishes), its tokens posted as
the rounds of `Scheduler.on_batch_done` would post them (`FastForward.post_span`). Exact, prefix caching
included (blocks are popped from the free list's head, so a span takes the same blocks, and frees them in the
same order, as the steps it replaces): tests compare every token time, step count and cache hit rate with
stepping (`InstanceConfig.fast_forward=False`).

Where a span starts:

- sequential policies: a step of every running sequence in which each samples, with nothing admissible
  waiting (`try_step_span`);
- multiplexed policies: a decode-alone launch with no prefill job in flight, paused or starting, whose
  decision the dispatcher would take again at each step end (`Dispatcher.repeats_decode_alone`;
  `try_mux_span`); or a decode launch beside a prefill job, up to the job's predicted end. Such a span runs on
  past a layer block's end only where the lanes' decision there keeps its decode steps as they are
  (`continue_span`); after the job's last block it may be extended by the decode-alone steps that follow, the
  job's sequences joining (`join_span`).

No span starts or runs on while the host KV tier has copies in flight or sequences swapped out or on their way
back (`tier_busy`): copies land, and swapped sequences resume, at step boundaries a span would skip. Nor, with
fair scheduling, while requests wait (`try_span`): every step may preempt for an under-served client.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import TYPE_CHECKING

import numpy as np

from ..core.scheduler import Batch, SchedulerOutput
from ..core.sequence import Sequence, SequenceStatus
from ..multiplex.mux_loop import LaneLaunch
from ..multiplex.perf_model import PerfModel
from .executor import OUTPUT_TOKEN, Sampled

if TYPE_CHECKING:
    from .instance import SimInstance

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
    run is costed with one `PerfModel.decode_times` call (the same floats as a call per step; a test checks
    it) and its start times are one running sum, as the step-by-step loop adds them."""
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
    """Steps fast-forwarded together: a first step as scheduled, then decode steps. Each sequence gets one
    token per step until it reaches its length."""

    seqs: list[Sequence]
    # Per sequence, (tokens left after the first step, context of the second step): the context is one past
    # the end of the first step's chunk, which is the sequence's first sampled position.
    after: list[tuple[int, int]]
    durations: array  # latency of each step
    ends: list[float]  # end time of each step
    posted: int = 0  # steps already posted (a span beside prefill blocks is posted up to each block's end)
    # The step each sequence joins at (None: all at the first). A joiner's `after` entry is written as if it
    # had been there from the first step:
    # (tokens left before its first step + start - 1, context there - start + 1).
    starts: list[int] | None = None


class FastForward:
    """The spans of one instance: which launches start one, how far it runs, and posting its steps. The
    instance launches and completes steps (`SimInstance.start_step`, `complete_step`) and asks this object at
    each launch; the span's steps are counted in the instance's statistics as they are added or cut."""

    def __init__(self, inst: SimInstance) -> None:
        self.inst = inst
        self.sched = inst.sched
        self.bm = inst.bm
        self.device = inst.device
        self.max_num_seqs = inst.config.max_num_seqs
        self.max_num_batched_tokens = inst.config.max_num_batched_tokens
        # Spans hold only steps that end before the horizon, so that what the cluster reads there (KV usage,
        # queued prompt tokens) is what stepping would show; otherwise steps that start before it. Fair
        # scheduling reads the clients' counters at each arrival (`Scheduler.add` lifts a returning client's):
        # they must hold every token served by then.
        self.sync_at_horizon = inst.sched.vtc is not None
        # A request's finish can create work (sessions, a concurrency cap): spans then stop at the first one.
        self.finish_is_event = False
        self.span: Span | None = None
        # A span beside prefill blocks: its split, and the length it may be cut back to when a block ended
        # inside it (set until the lanes have decided).
        self.split: tuple[int, int] | None = None
        self.cut: int | None = None

    # ---- where spans start -------------------------------------------------------------------------------
    def try_step_span(
        self, out: SchedulerOutput, sampled: Sampled, now: float, dt: float, horizon: float
    ) -> Span | None:
        """The span a sequential policy's step (`out`, launched at `now`, taking `dt`) starts, now
        `self.span`, or None. It may start with any step of every running sequence in which each samples
        (decodes, and prompts whose last chunk runs): afterwards all of them decode. A prompt cut short would
        prefill again."""
        batch = out.batches[0]
        if now + dt >= horizon or out.preempted or sampled.skip or self.tier_busy():
            return None
        if batch.num_seqs != len(self.sched.running) or batch.num_seqs > self.max_num_batched_tokens:
            return None
        self.span = self.try_span(batch, now, dt, horizon, self.device.total_sms)
        return self.span

    def try_span(
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
        prefill, no preemption, the same split). So those steps are applied at once, each step's latency from
        the performance model for the sequences still running in it.

        Multiplexed, `beside_prefill`: the steps run beside prefill layer blocks, contended. While a block
        runs the lanes relaunch the decode step with no decision (the queue does not matter), so the span may
        run past the block's end: there the steps that ended are posted, the lanes decide, and the span goes
        on only if the decision keeps the decode steps as they are (see `at_block_end`, `continue_span`)."""
        contended = False
        if not beside_prefill:
            # Requests waiting while every sequence slot is taken cannot be admitted until one finishes: the
            # span then ends at the first finish (the next step may admit). With fairness each of those steps
            # may preempt a running request for a waiting one (`Scheduler.preempt_for_fairness`): no span.
            blocked = bool(self.sched.waiting)
            if blocked and (batch.num_seqs < self.max_num_seqs or self.sched.vtc is not None):
                return None
            stop = blocked or self.finish_is_event
        else:
            stop = self.finish_is_event
            contended = True
        items = batch.items
        seqs = [i.seq for i in items]
        # After the first step, sequence s has (left - 1) tokens to go, and the second step's context is
        # one past the first's chunk (its sampled token's position, plus that token).
        after = [
            (s.max_tokens - (len(s.token_ids) - s.num_prompt_tokens) - 1, i.start + i.num_new_tokens + 1)
            for s, i in zip(seqs, items, strict=True)
        ]
        further = self.run_from(after, now + dt, horizon, stop, decode_sms, contended)
        if not further and not beside_prefill:
            return None
        k = len(further)  # steps after the first (none: the job's prompts may join after it, see `join_span`)
        if not self.span_kv_ok(seqs, after, k):
            return None
        durations = array("d", [dt])
        durations.extend(further)
        return Span(seqs, after, durations, list(accumulate(durations, initial=now))[1:])

    def try_mux_span(self, launch: LaneLaunch, now: float, dt: float, horizon: float) -> Span | None:
        """The span a multiplexed decode launch (at `now`, taking `dt`) starts, now `self.span`, or None:
        beside a prefill block in flight, until the job's predicted end (the lanes relaunch decode without a
        decision; each block's end may cut the span, see `continue_span`); or from a decode-alone launch with
        no prefill job in flight, paused or starting, whose decision the dispatcher repeats (decode alone,
        same split; see `Dispatcher.repeats_decode_alone`) at each step end until something can start a
        prefill."""
        inst = self.inst
        policy, lanes = inst.policy, inst.lanes
        batch, split = launch.decode, launch.split
        assert batch is not None and split is not None and lanes is not None
        job = lanes.prefill
        if self.tier_busy():
            return None
        if job is not None:
            assert inst.prefill_end is not None
            if launch.preempted:
                return None
            # Up to the step in flight when the job's last block ends: its prompts join the steps after that
            # (`join_span`, where the decision there is predictable).
            done = job.layers_done + lanes.prefill_layers
            job_end = inst.prefill_end
            if done < job.num_layers:
                job_end += self.device.prefill_layers_time(
                    job.shapes, split.prefill_sms, done, job.num_layers - done, contended=True
                )
            span = self.try_span(batch, now, dt, min(horizon, job_end), split.decode_sms, beside_prefill=True)
        else:
            decision = launch.decision
            if decision is None or launch.preempted:
                return None
            if not policy.dispatcher.repeats_decode_alone(decision):
                return None
            if policy.active is not None or policy.paused is not None or launch.new_job is not None:
                return None
            if batch.num_seqs != len(self.sched.running):
                return None
            span = self.try_span(batch, now, dt, horizon, split.decode_sms)
        if span is not None:
            self.span, self.split = span, (split.prefill_sms, split.decode_sms)
        return span

    def tier_busy(self) -> bool:
        """Copies between the KV tiers collected or in flight, or sequences swapped out or coming back."""
        bm, sched = self.bm, self.sched
        return bool(bm.copies_outstanding or not bm.pending.is_empty or sched.swapped or sched.num_resuming)

    # ---- how far a span runs -----------------------------------------------------------------------------
    def run_from(
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

    def span_kv_ok(self, seqs: list[Sequence], after: list[tuple[int, int]], k: int) -> bool:
        """Whether the free pool holds the blocks the running ones of `seqs` need for `k` decode steps after a
        span's first. The first step's chunk fits its blocks, so k more tokens need at most ceil(k / block
        size) more blocks a sequence: only a pool short of that bound is worth counting exactly."""
        roomy = len(seqs) * -(-k // self.bm.block_size) <= self.bm.num_free_blocks
        return roomy or self.span_fits_kv(seqs, after, k)

    def span_fits_kv(self, seqs: list[Sequence], after: list[tuple[int, int]], k: int) -> bool:
        """`span_kv_ok`, counted block by block (a sequence stops at its length)."""
        bm = self.bm
        need = 0
        finished = SequenceStatus.FINISHED
        for seq, (left, context) in zip(seqs, after, strict=True):
            if left > 0 and seq.status is not finished:  # the first chunk ends at context - 1
                need += bm.blocks_needed(context - 1 + min(left, k)) - len(seq.block_table)
        return need <= bm.num_free_blocks

    def cut_span(self, steps: int) -> None:
        """End the running span after its first `steps` steps (the rest would have been stepped)."""
        span = self.span
        assert span is not None and span.posted < steps
        extra = len(span.durations) - steps
        if extra <= 0:
            return
        del span.durations[steps:]
        del span.ends[steps:]
        self.inst.decode_end = span.ends[-1]
        self.inst.count_forwarded(-extra, self.split)

    # ---- at a prefill block's end, beside a span ---------------------------------------------------------
    def at_block_end(self, now: float) -> tuple[list[Sequence], bool]:
        """A prefill block ends at `now`, inside the span. Where a span step ends at `now` too, both lanes
        complete together, as when stepping: the span is cut there for the caller to post whole, and ([],
        True) returned. Otherwise the steps that ended are posted, the step in flight stays in flight while
        the lanes decide beside it (`continue_span`), and (the sequences posted, False) returned."""
        span = self.span
        assert span is not None
        upto = bisect_right(span.ends, now, lo=span.posted)  # steps that have ended
        if upto > span.posted and span.ends[upto - 1] == now:
            self.cut_span(upto)
            return [], True
        advanced = self.post_span(span, upto)
        self.cut = upto + 1  # the lanes decide beside step `upto`
        return advanced, False

    def continue_span(self, launch: LaneLaunch, horizon: float, job_finished: bool) -> None:
        """A prefill block ended inside the running span, which `at_block_end` posted up to the step in
        flight, and the lanes have decided (`launch`). The span's later steps stand only if the prefill lane
        runs the next block beside them (so the lanes relaunch decode with no decision, contended), the block
        did not finish its job (`job_finished`: its prompts would join the next decode launch), nothing was
        preempted, the pool still holds their KV after any admission, and they start before the next event;
        otherwise it ends with the step in flight, and where the block finished its job, the job's sequences
        may join it after that step (`join_span`)."""
        span = self.span
        cut, self.cut = self.cut, None
        assert span is not None and cut is not None
        steps = len(span.durations)
        ok = (
            launch.prefill is not None
            and launch.prefill_layers > 0
            and not launch.preempted
            and not job_finished
            and (launch.new_job is None or self.span_kv_ok(span.seqs, span.after, steps - 1))
            and not self.tier_busy()
        )
        if ok:
            # Step i > 0 starts when step i - 1 ends.
            before = bisect_left(span.ends, horizon) + (0 if self.sync_at_horizon else 1)
            self.cut_span(max(cut, min(steps, before)))
            return
        self.cut_span(cut)
        if job_finished and launch.prefill is None and not launch.preempted:
            self.join_span(horizon)

    def join_span(self, horizon: float) -> None:
        """The job that just finished leaves the prefill lane idle; after the decode step in flight the lanes
        decide again, and with nothing waiting and no other job that decision is, where the dispatcher knows
        it (`Dispatcher.quiet_decode_split`), the decode step of every running sequence, uncontended, on the
        split for decode alone: the span's sequences and those of the jobs that finished while it ran. Those
        steps are appended to the span (up to the next event, as any span), the jobs' sequences joining it at
        the first of them."""
        span, inst = self.span, self.inst
        policy = inst.policy
        assert span is not None
        if self.tier_busy():
            return
        split = policy.dispatcher.quiet_decode_split(
            policy.splits,
            waiting=bool(self.sched.waiting),
            started=policy.active is not None or policy.paused is not None,
        )
        if split is None:
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
        run = self.run_from(after, start, horizon, self.finish_is_event, split.decode_sms, False)
        if not run or not self.span_kv_ok(seqs, after, len(run)):
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
        inst.decode_end = span.ends[-1]
        self.split = (
            split.prefill_sms,
            split.decode_sms,
        )  # (a joined span is never cut: no block ends in it)
        inst.count_forwarded(len(run), self.split)
        assert inst.lanes is not None
        inst.lanes.split = split  # as the decision after the step in flight sets it

    # ---- posting -----------------------------------------------------------------------------------------
    def post_span(self, span: Span, upto: int) -> list[Sequence]:
        """Post the span's steps from `span.posted` up to `upto`: sequence s gets one token per step until it
        reaches its length (what the rounds of `on_batch_done` would do); finished ones retire in the order
        they finished. Short of the span's end, step `upto` is in flight: its sequences stay in flight and
        hold its KV slots, allocated as its launch would have. Returns the span's sequences for the caller to
        stamp (none when no step ended)."""
        sched, bm = self.sched, self.bm
        done, span.posted = span.posted, upto
        whole = upto == len(span.durations)
        if upto == done and not whole:
            return []  # no step ended since the last posting; the one in flight has its slots already
        block_size = bm.block_size
        register = bm.register_full_blocks if bm.enable_prefix_caching else None
        finished_status = SequenceStatus.FINISHED
        vtc = sched.vtc
        finished: list[tuple[int, int, Sequence]] = []
        starts = span.starts
        if bm.host is not None:
            self._allocate_step_by_step(span, done, upto)
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
            if vtc is not None:  # as `on_batch_done` charges each token (fair scheduling)
                vtc.charge(seq.slo.client, output_tokens=last - first)
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

    def _allocate_step_by_step(self, span: Span, done: int, upto: int) -> None:
        """The blocks `post_span` needs, taken one at a time in the order stepping takes them: each step's
        launch, every sequence in running order (`decode_all`). Which ids a sequence gets only matters to the
        host tier, whose copies coalesce consecutive ids into runs; elsewhere `post_span` takes a sequence's
        blocks at once. Exact because nothing frees blocks inside a span with a host tier (it ends at the
        first finish)."""
        bm = self.bm
        bs = bm.block_size
        rank = {id(s): i for i, s in enumerate(self.sched.running)}
        whole = upto == len(span.durations)
        starts = span.starts
        needs: list[tuple[int, int, Sequence]] = []  # (step whose launch takes the block, rank, sequence)
        for pos, (seq, (rest, context)) in enumerate(zip(span.seqs, span.after, strict=True)):
            if seq.status is SequenceStatus.FINISHED:
                continue
            first = done if starts is None or starts[pos] <= done else starts[pos]
            last = rest + 1 if rest + 1 < upto else upto
            if last <= first:
                continue
            slots = context - 2 + last + (0 if whole or last == rest + 1 else 1)  # as `post_span`
            cap = len(seq.block_table) * bs
            # Step j's launch needs slots for context - 1 + j tokens.
            needs += [
                (cap + m * bs - context + 2, rank[id(seq)], seq) for m in range(-(-(slots - cap) // bs))
            ]
        needs.sort(key=itemgetter(0, 1))
        for _, _, seq in needs:
            ok = bm.allocate(seq, (len(seq.block_table) + 1) * bs - seq.num_computed_tokens)
            assert ok, "span KV was checked when it started"

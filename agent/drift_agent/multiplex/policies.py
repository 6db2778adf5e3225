"""The multiplexing policies, `drift` (adaptive) and `static-split` (fixed split, like semi-PD), as scheduler
policies. Pure: they turn the scheduler's queues into a `DispatchState`, ask the `Dispatcher`, and act on its
decision. A prefill runs as a *job* launched a few layers at a time while decode steps run beside it;
`mux_loop.MuxLanes` drives jobs and batches the same way for the real engine and the simulator.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.config import MULTIPLEX_POLICIES, POLICIES, EngineConfig, PartitionConfig
from ..core.policies import SEQUENTIAL_POLICIES, decode_all
from ..core.scheduler import Batch, Policy, ScheduledSeq, Scheduler, SchedulerOutput
from ..core.sequence import Sequence
from ..partition.base import Split
from .dispatcher import (
    CATCH_UP_FLOOR,
    DecodeLoad,
    DispatchDecision,
    Dispatcher,
    DispatcherConfig,
    DispatchState,
    InFlightPrefill,
    PrefillAction,
    PrefillRequest,
)
from .perf_model import PerfModel, PrefillShape

# Waiting requests the dispatcher looks at per decision (EDF over the oldest ones keeps decisions O(1)-ish).
MAX_WAITING_CONSIDERED = 256
_job_ids = itertools.count()


@dataclass
class PrefillJob:
    """A prefill batch in progress: its sequences stay in flight until the last layer has run."""

    batch: Batch
    num_layers: int
    ttft_deadline_s: float
    layers_done: int = 0
    job_id: int = field(default_factory=lambda: next(_job_ids))
    # The batch's prefill shapes, for the performance model (a job's items do not change).
    shapes: tuple[PrefillShape, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = tuple(PrefillShape(i.num_new_tokens, i.start) for i in self.batch.items)

    @property
    def done(self) -> bool:
        return self.layers_done >= self.num_layers

    def as_in_flight(self) -> InFlightPrefill:
        return InFlightPrefill(
            request_ids=tuple(i.seq.request_id for i in self.batch.items),
            shapes=self.shapes,
            layers_done=self.layers_done,
            ttft_deadline_s=self.ttft_deadline_s,
        )


@dataclass
class MuxSchedule(SchedulerOutput):
    """What `MultiplexPolicy.schedule` returns: the batches and split, the decision, and the prefill job and
    layers the prefill lane launches now."""

    # The decision (None only when deferred before deciding: no prefill work could start).
    decision: DispatchDecision | None = None
    # Taken back: nothing launches and nothing changed; the lanes decide again at the next sync point.
    deferred: bool = False
    prefill_job: PrefillJob | None = None  # the job whose next `prefill_layers` layers launch now
    # `prefill_job` when it starts now (its batch runs on the prefill lane, not among `batches`).
    new_prefill_job: PrefillJob | None = None
    prefill_layers: int = 0


@dataclass
class MuxContext:
    """What a multiplexing policy needs from the engine (or simulator) it runs in."""

    perf_model: PerfModel
    splits: list[Split]
    num_layers: int


def dispatcher_config(name: str, partition: PartitionConfig) -> DispatcherConfig:
    """`static-split`, or `drift` with partition mode static/off, uses one fixed split; `drift` with auto
    adapts, planning decode against its step budget / (1 + `tpot_margin`) (the lever the operator steers)."""
    fixed = name == "static-split" or partition.mode in ("static", "off")
    return DispatcherConfig(
        mode="static" if fixed else "slo",
        # The dispatcher needs SMs on both sides of a static split: 0 and 1 mean the nearest mixed split.
        static_prefill_share=min(max(partition.prefill_sm_share, 0.01), 0.99),
        fold_max_tokens=partition.fold_max_tokens,
        # Only the adaptive mode plans against the decode budget; a fixed split has no use for the margin.
        tpot_margin=0.0 if fixed else partition.tpot_margin,
    )


class MultiplexPolicy:
    multiplexing = True

    def __init__(self, name: str, ctx: MuxContext, config: DispatcherConfig) -> None:
        self.name = name
        self.ctx = ctx
        self.splits = tuple(ctx.splits)  # immutable: the dispatcher keeps what it derives from them
        if config.mode == "static" and not any(s.is_mixed for s in self.splits):
            raise ValueError("static split needs a device with at least one mixed split")
        self.dispatcher = Dispatcher(ctx.perf_model, config)
        self.active: PrefillJob | None = None
        self.paused: PrefillJob | None = None
        self._last: DispatchDecision | None = None
        self._waiting_memo: dict[int, tuple[int, PrefillRequest]] = {}

    def reconfigure(self, engine_config: EngineConfig) -> None:
        """Partition settings changed at run time (admin API)."""
        self.dispatcher = Dispatcher(
            self.ctx.perf_model, dispatcher_config(self.name, engine_config.partition)
        )

    # ---- state for the dispatcher ------------------------------------------------------------------
    def _decode_load(self, running: list[Sequence], now: float) -> DecodeLoad:
        """One pass over the running sequences that decode (the `DecodeRequest` fields, summed up without
        building them)."""
        borrow, floor = self.dispatcher.config.max_slack_borrow, CATCH_UP_FLOOR
        batch = kv = 0
        budget = math.inf
        for seq in running:
            n = len(seq.token_ids)
            p = seq.num_prompt_tokens
            # `seq.is_prefilling`, inlined (this loop runs once per sequence per decision). A step in flight
            # on the decode lane still counts: its sequences decode next too.
            if n - seq.num_computed_tokens > 1 or n == p:
                continue
            batch += 1
            kv += n
            first = seq.times.first_token
            t = seq.slo.tpot  # every queued request has its targets (`Scheduler.add`)
            # `DecodeRequest.step_budget(borrow)` with n - p - 1 tokens since the first, inlined; n > p here.
            # The clamp can only lower the budget if the slack or the borrow cap is below it, so most
            # sequences stop at the test.
            slack = t * (n - p) if first is None or first > now else t * (n - p) - (now - first)
            hi = borrow * t
            if slack < budget or hi < budget:
                lo = floor * t
                b = lo if slack < lo else (hi if slack > hi else slack)
                if b < budget:
                    budget = b
        return DecodeLoad(batch, kv, budget) if batch else DecodeLoad()

    def _prefill_requests(self, sched: Scheduler, seqs: list[Sequence]) -> list[PrefillRequest]:
        """The dispatcher's view of the waiting requests considered (one pass a decision, over up to
        `MAX_WAITING_CONSIDERED` of them)."""
        if sched.bm.enable_prefix_caching:
            return [self._prefill_request(sched, s) for s in seqs]
        # Without a prefix cache a waiting request looks the same every decision until its tokens change (a
        # preempted one returns with its outputs): built once, keyed by its token count.
        memo = self._waiting_memo
        out = []
        for s in seqs:
            n = len(s.token_ids)
            m = memo.get(s.seq_id)
            if m is None or m[0] != n:
                if len(memo) >= 4 * MAX_WAITING_CONSIDERED:
                    memo.clear()  # drops admitted and finished requests' entries too
                m = memo[s.seq_id] = (n, self._prefill_request(sched, s))
            out.append(m[1])
        return out

    @staticmethod
    def _fair(sched: Scheduler, reqs: list[PrefillRequest], seqs: list[Sequence]) -> list[PrefillRequest]:
        """With fairness, each request carries its client's counter now (the dispatcher orders by it, EDF
        within a client); the memo keeps the counter-free request, since counters change every step."""
        vtc = sched.vtc
        if vtc is None:
            return reqs
        return [replace(r, fair_share=vtc.counter(s.slo.client)) for r, s in zip(reqs, seqs, strict=True)]

    def _prefill_request(self, sched: Scheduler, seq: Sequence) -> PrefillRequest:
        bm = sched.bm
        hit = bm.lookup_prefix(seq)  # host hits are copied in, not computed, but need device blocks
        revived = sum(1 for b in hit.device if bm.blocks[b].ref_count == 0)
        return PrefillRequest(
            request_id=seq.request_id,
            new_tokens=seq.num_tokens - hit.num_blocks * bm.block_size,
            cached_tokens=hit.num_blocks * bm.block_size,
            arrival_s=seq.times.arrival,
            ttft_deadline_s=seq.times.arrival + seq.slo.ttft,
            kv_blocks=bm.blocks_needed(seq.num_tokens) - len(hit.device) + revived,
            priority=seq.slo.priority,
        )

    # ---- the policy ----------------------------------------------------------------------------------
    def schedule(
        self, sched: Scheduler, now: float, decode_busy: bool = False, split: Split | None = None
    ) -> MuxSchedule:
        """Decide the split, the prefill work and (unless `decode_busy`: a step is in flight on the decode
        lane) the decode batch. With `decode_busy` the decision only stands if it launches prefill layers on
        the current `split`; otherwise nothing changes and the schedule is `deferred` (the lanes sync
        first)."""
        # Only as many as there are sequence slots: the rest wait for decodes to finish, not for prefill.
        slots = sched.config.max_num_seqs - sched.num_active
        if decode_busy and self.active is None and self.paused is None and (not sched.waiting or slots <= 0):
            # No prefill work can start: the decision could only be taken back.
            return MuxSchedule(deferred=True)
        # With fairness the window the dispatcher sees holds the least-served clients' requests first.
        sched.begin_step()
        waiting = list(itertools.islice(sched.waiting, max(0, min(slots, MAX_WAITING_CONSIDERED))))
        state = DispatchState(
            now_s=now,
            splits=self.splits,
            decode=self._decode_load(sched.running, now),
            waiting=self._fair(sched, self._prefill_requests(sched, waiting), waiting),
            free_kv_blocks=sched.bm.num_free_blocks - sched.admission_reserve,
            in_flight=self.active.as_in_flight() if self.active else None,
            paused=self.paused.as_in_flight() if self.paused else None,
            slot_bound=len(sched.waiting) > slots,
        )
        stalled = self.dispatcher.prefill_stall_steps
        decision = self.dispatcher.decide(state)
        if decode_busy and (
            split is None
            or (decision.split.prefill_sms, decision.split.decode_sms)
            != (split.prefill_sms, split.decode_sms)
            or decision.prefill_layers <= 0
        ):
            self.dispatcher.restore_stall_steps(stalled)  # taken back: decided again at the sync point
            return MuxSchedule(decision=decision, deferred=True)
        out = MuxSchedule(decision=decision)
        new_job = False
        if decision.prefill_action in (PrefillAction.LAUNCH, PrefillAction.OVERTAKE):
            job = self._launch(sched, decision.launch_ids, waiting)
            if job is not None:
                if decision.prefill_action is PrefillAction.OVERTAKE and self.active is not None:
                    self.paused = self.active
                self.active, new_job = job, True
        elif decision.prefill_action is PrefillAction.RESUME and self.active is None:
            self.active, self.paused = self.paused, None
        if decision.run_decode and not decode_busy:
            items, _ = decode_all(sched, 1 << 30, out.preempted)
            # Folding: whole prompts join the decode step (admitted after the decodes, as chunked prefill).
            folded = (
                self._admit(sched, decision.launch_ids, waiting)
                if decision.prefill_action is PrefillAction.FOLD
                else []
            )
            if items or folded:
                out.batches.append(Batch(items + folded, "mixed" if folded else "decode"))
        layers = 0
        if self.active is not None:
            layers = min(decision.prefill_layers, self.active.num_layers - self.active.layers_done)
        out.split = (decision.split.prefill_sms, decision.split.decode_sms)
        out.prefill_job = self.active if layers > 0 else None
        out.new_prefill_job = self.active if new_job else None
        out.prefill_layers = layers
        self._last = decision
        return out

    @property
    def last_decision(self) -> dict[str, Any] | None:
        """The last decision that stood (not one taken back), for inspection; built on demand."""
        return self._last.to_dict() if self._last is not None else None

    @staticmethod
    def decode_batch(sched: Scheduler, preempted: list[Sequence]) -> Batch | None:
        """One decode step of every running sequence that is not in flight (the newest preempted for room)."""
        items, _ = decode_all(sched, 1 << 30, preempted)
        return Batch(items, "decode") if items else None

    @staticmethod
    def _admit(sched: Scheduler, ids: tuple[str, ...], waiting: list[Sequence]) -> list[ScheduledSeq]:
        """Admit the waiting requests `ids` whole (those that still fit)."""
        by_id = {s.request_id: s for s in waiting}
        items = []
        for rid in ids:
            seq = by_id.get(rid)
            if seq is None:
                continue
            item = sched.try_admit(seq, seq.num_tokens, whole_only=True)
            if item is not None:
                items.append(item)
        return items

    def _launch(self, sched: Scheduler, ids: tuple[str, ...], waiting: list[Sequence]) -> PrefillJob | None:
        items = self._admit(sched, ids, waiting)
        if not items:
            return None
        deadline = min(s.seq.times.arrival + s.seq.slo.ttft for s in items)
        return PrefillJob(Batch(items, "prefill"), self.ctx.num_layers, deadline)

    def on_job_done(self, job: PrefillJob) -> None:
        if job is self.active:
            self.active = None
        elif job is self.paused:
            self.paused = None


def make_policy(
    name: str, engine_config: EngineConfig, mux_context: Callable[[], MuxContext] | None = None
) -> Policy:
    """A policy by name, for the engine and the simulator alike. The multiplexing ones also need the
    performance model and SM splits: `mux_context` is called only for them (the engine builds its context
    lazily)."""
    if name in SEQUENTIAL_POLICIES:
        return SEQUENTIAL_POLICIES[name]()
    if name not in MULTIPLEX_POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if mux_context is None:
        raise ValueError(f"policy {name!r} needs a performance model and SM splits (a MuxContext)")
    return MultiplexPolicy(name, mux_context(), dispatcher_config(name, engine_config.partition))

"""Continuous batching over the block manager. Pure: sequences and block ids in, batches out.

The `Scheduler` owns the queues and the mechanics every policy shares (admit with prefix-cache lookup, grow,
preempt, finish, post-process a finished batch). A `Policy` decides what runs next and returns a
`SchedulerOutput` holding one or more batches; sequential policies return one batch per step, a multiplexing
policy returns a prefill batch and a decode batch meant to run concurrently on separate SM partitions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .block_manager import BlockManager
from .config import EngineConfig
from .errors import PromptTooLongError
from .fairness import VirtualTokenCounter
from .preemption import SwapCosts
from .sequence import SLO, FinishReason, Sequence, SequenceStatus

Phase = Literal["prefill", "decode", "mixed"]


_ENGINE = EngineConfig.model_fields  # the defaults, defined once with the engine's options


@dataclass
class SchedulerConfig:
    block_size: int = _ENGINE["block_size"].default
    max_num_seqs: int = _ENGINE["max_num_seqs"].default
    max_num_batched_tokens: int = _ENGINE["max_num_batched_tokens"].default
    max_model_len: int = 4096
    # Share of the KV pool a new admission must leave free while sequences run, for their decode growth
    # (vLLM's watermark): without it an admission-first policy under overload fills the pool with prompts
    # and then preempts them again one decode step later, over and over.
    kv_watermark: float = 0.01
    # "vtc": the waiting queue orders by (priority, the client's virtual token counter, arrival) instead of
    # (priority, arrival), so a client flooding the queue cannot starve the others.
    fairness: str = _ENGINE["fairness"].default
    # With fairness: a running request of a client served this many weighted tokens more than the client of
    # the oldest waiting request, which cannot start, is preempted for it (one per step).
    fairness_preempt_gap: float = _ENGINE["fairness_preempt_gap"].default
    # recompute: a victim's KV is dropped; swap: copied to the host tier and back; auto: per victim, whichever
    # `swap_costs` says is cheaper. Without a host tier every mode recomputes.
    preemption_mode: str = _ENGINE["preemption_mode"].default
    # The targets of requests that bring none (`EngineConfig.default_slo`), filled in by `add` for every
    # request queued (engine, Python API, simulator), so the policies read `seq.slo` as it is.
    default_slo: SLO = field(
        default_factory=lambda: SLO.from_ms(_ENGINE["slo_ttft_ms"].default, _ENGINE["slo_tpot_ms"].default)
    )


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first token position computed in this batch (== seq.num_computed_tokens when scheduled)
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the model produces the next one."""
        return self.end == self.seq.num_tokens


@dataclass
class Batch:
    items: list[ScheduledSeq]
    phase: Phase

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items)

    @property
    def num_seqs(self) -> int:
        return len(self.items)


@dataclass
class SchedulerOutput:
    batches: list[Batch] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (prefill SMs, decode SMs) chosen by a multiplexing policy; None for sequential policies.
    split: tuple[int, int] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.batches


class Policy(Protocol):
    name: str

    def schedule(self, sched: Scheduler, now: float) -> SchedulerOutput: ...


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: Policy) -> None:
        self.config = config
        self.bm = block_manager
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Swapped out, in arrival order; and those whose KV is on its way back, per submission of copies.
        self.swapped: deque[Sequence] = deque()
        self.resuming: dict[int, list[Sequence]] = {}
        self.num_resuming = 0
        # A swapped-out sequence cannot come back for lack of blocks: new admissions wait, or it would starve.
        self.admission_blocked = False
        self.swap_costs = SwapCosts()
        self.num_preemptions = 0
        self.num_swap_preemptions = 0
        self.num_fairness_preemptions = 0
        self.num_recomputed_tokens = 0  # KV tokens computed again after recompute preemptions
        self.watermark_blocks = int(config.kv_watermark * block_manager.num_blocks)
        self.vtc: VirtualTokenCounter | None = VirtualTokenCounter() if config.fairness == "vtc" else None

    def set_fairness(self, fairness: str) -> None:
        """Switch fair scheduling at run time; switching it on starts every client's counter at zero."""
        if fairness != self.config.fairness:
            self.config.fairness = fairness
            self.vtc = VirtualTokenCounter() if fairness == "vtc" else None

    # ---- request lifecycle ---------------------------------------------------------------------------
    def check_fits(self, seq: Sequence) -> None:
        """Reject now what could never run, instead of letting it wait forever."""
        n = seq.num_prompt_tokens
        if n + 1 > self.config.max_model_len:
            raise PromptTooLongError(
                f"prompt has {n} tokens; the context window is {self.config.max_model_len} "
                f"(prompt plus at least one output token must fit)"
            )
        if self.bm.blocks_needed(n + 1) > self.bm.num_blocks:
            raise PromptTooLongError(
                f"prompt has {n} tokens but the KV pool holds only {self.bm.num_blocks * self.bm.block_size}"
            )

    def add(self, seq: Sequence) -> None:
        """Queue `seq` behind every waiting sequence of the same or a more urgent priority (lower value first,
        as vLLM's `priority`; FCFS within a priority, so with all priorities 0 this is plain FCFS). Its
        missing SLO targets are the defaults of now."""
        self.check_fits(seq)
        seq.slo = seq.slo.with_defaults(self.config.default_slo)
        if self.vtc is not None:
            active = [s.slo.client for s in self.waiting]
            active += [s.slo.client for s in self.running]
            if seq.slo.client not in active:
                self.vtc.lift(seq.slo.client, active)
        seq.status = SequenceStatus.WAITING
        waiting, p = self.waiting, seq.slo.priority
        i = len(waiting)
        while i and waiting[i - 1].slo.priority > p:
            i -= 1
        if i == len(waiting):
            waiting.append(seq)
        else:
            waiting.insert(i, seq)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End a sequence now (stop string, abort). An in-flight one is finished when its batch returns."""
        if seq.is_finished:
            return
        if seq.finish_reason is None or reason in (FinishReason.ABORT, FinishReason.ERROR):
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.in_flight:
            seq.abort_pending = True
            return
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.SWAPPED and seq in self.swapped:
            self.swapped.remove(seq)
            self.bm.free_host_blocks(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.abort_pending = False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.num_resuming)

    @property
    def num_active(self) -> int:
        """Sequences holding a sequence slot: running, or on their way back from the host tier."""
        return len(self.running) + self.num_resuming

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def order_waiting(self) -> None:
        """With fairness, put the least-served clients' requests first (within a priority); a stable sort, so
        each client's requests keep their order (FCFS, preempted ones first). Counters change as tokens are
        served, hence once per decision rather than at insertion. Nothing without fairness."""
        vtc = self.vtc
        if vtc is None or len(self.waiting) < 2:
            return
        ordered = sorted(self.waiting, key=lambda s: (s.slo.priority, vtc.counter(s.slo.client)))
        self.waiting.clear()
        self.waiting.extend(ordered)

    def begin_step(self) -> None:
        """What every policy's step starts with: order the waiting queue (fairness), bring swapped-out
        sequences back while the pool has room, and preempt for an under-served client."""
        self.order_waiting()
        if self.swapped:
            self.resume_swapped()
        else:
            self.admission_blocked = False
        if self.vtc is not None and self.waiting and self.running:
            self.preempt_for_fairness()

    def schedule(self, now: float) -> SchedulerOutput:
        self.begin_step()
        out = self.policy.schedule(self, now)
        self.stamp_scheduled(out.batches, now)
        return out

    @staticmethod
    def stamp_scheduled(batches: list[Batch], now: float) -> None:
        """Record when each sequence in `batches` was first scheduled. A decode batch is skipped: its
        sequences were all scheduled before, for their prefill (a sequence handed over from elsewhere brings
        its time)."""
        for batch in batches:
            if batch.phase == "decode":
                continue
            for item in batch.items:
                if item.seq.times.first_scheduled is None:
                    item.seq.times.first_scheduled = now

    def check_invariants(self) -> None:
        """The queues agree with the sequences' states and the block refcounts with the block tables (tests,
        and the engine after a failed step). Raises AssertionError."""
        bm = self.bm
        bm.check_invariants()
        queued: set[int] = set()
        refs, host_refs = bm.held_by_copies()
        bs = bm.block_size

        def queue_once(seq: Sequence, holds: dict[int, int], table: list[int]) -> None:
            """`seq` is in one queue only; count the references its `table` holds."""
            if id(seq) in queued:
                raise AssertionError(f"{seq} is queued twice")
            queued.add(id(seq))
            for bid in table:
                holds[bid] = holds.get(bid, 0) + 1

        for seq in self.swapped:
            if seq.status is not SequenceStatus.SWAPPED or seq.block_table or seq.in_flight:
                raise AssertionError(
                    f"swapped {seq} is {seq.status.value}, holds device blocks or is in flight"
                )
            if len(seq.host_block_table) != bm.blocks_needed(seq.num_computed_tokens):
                raise AssertionError(f"swapped {seq} has {len(seq.host_block_table)} host blocks for its KV")
            queue_once(seq, host_refs, seq.host_block_table)
        resuming = [seq for seqs in self.resuming.values() for seq in seqs]
        if len(resuming) != self.num_resuming:
            raise AssertionError(f"{len(resuming)} sequences resuming, {self.num_resuming} counted")
        for seq in resuming:
            if seq.status is not SequenceStatus.SWAPPED or not seq.in_flight or seq.host_block_table:
                raise AssertionError(f"resuming {seq} is {seq.status.value}, idle or still holds host blocks")
            queue_once(seq, refs, seq.block_table)
        for seq in self.waiting:
            if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.in_flight:
                raise AssertionError(f"waiting {seq} is {seq.status.value}, holds blocks or is in flight")
            queue_once(seq, refs, [])
        for seq in self.running:
            if seq.status is not SequenceStatus.RUNNING:
                raise AssertionError(f"running {seq} is {seq.status.value}")
            queue_once(seq, refs, seq.block_table)
            if not seq.num_computed_tokens <= min(seq.num_tokens, len(seq.block_table) * bs):
                raise AssertionError(f"{seq} has KV beyond its tokens or its blocks")
        tiers = [("block", bm.blocks, refs, "sequences and copies")]
        if bm.host is not None:
            tiers.append(("host block", bm.host.blocks, host_refs, "swapped sequences and copies"))
        for name, blocks, holds, holders in tiers:
            for block in blocks:
                if block.ref_count != holds.get(block.block_id, 0):
                    raise AssertionError(
                        f"{name} {block.block_id} has refcount {block.ref_count} but "
                        f"{holds.get(block.block_id, 0)} {holders} hold it"
                    )

    # ---- mechanics shared by policies ----------------------------------------------------------------
    @property
    def admission_reserve(self) -> int:
        """KV blocks an admission must leave free now (none when nothing runs, so any prompt that fits the
        pool can always start)."""
        return self.watermark_blocks if self.running or self.num_resuming else 0

    def try_admit(self, seq: Sequence, max_new_tokens: int, whole_only: bool = False) -> ScheduledSeq | None:
        """Move waiting `seq` into running with up to `max_new_tokens` of its prompt scheduled (all of it
        or nothing when `whole_only`). Prefix-cache hits are skipped over. Returns None, changing nothing,
        if it does not fit with the watermark left free."""
        if self.num_active >= self.config.max_num_seqs or max_new_tokens <= 0 or self.admission_blocked:
            return None
        hit = self.bm.lookup_prefix(seq)
        n_cached = hit.num_blocks * self.bm.block_size
        if whole_only and seq.num_tokens - n_cached > max_new_tokens:
            return None
        n_new = min(seq.num_tokens - n_cached, max_new_tokens)
        if not self.bm.allocate(seq, n_new, hit, reserve=self.admission_reserve):
            return None
        if seq.num_cached_tokens < 0:  # count each request's lookup once, not again after a preemption
            seq.num_cached_tokens = n_cached
            self.bm.record_prefix_lookup(seq.num_prompt_tokens, n_cached, len(hit.host) * self.bm.block_size)
            if self.vtc is not None:  # VTC charges the prompt when the request is first admitted
                self.vtc.charge(seq.slo.client, prompt_tokens=seq.num_prompt_tokens)
        if seq.num_dropped_tokens:
            self.num_recomputed_tokens += max(0, seq.num_dropped_tokens - n_cached)
            seq.num_dropped_tokens = 0
        seq.num_computed_tokens = n_cached
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return self._scheduled(seq, n_new)

    def try_grow(self, seq: Sequence, num_new_tokens: int) -> ScheduledSeq | None:
        # The per-step case needs no allocation: the last block still has room (checked here, once per
        # sequence per step, before calling into the block manager).
        room = len(seq.block_table) * self.bm.block_size - seq.num_computed_tokens
        if num_new_tokens > room and not self.bm.allocate(seq, num_new_tokens):
            return None
        return self._scheduled(seq, num_new_tokens)

    @staticmethod
    def _scheduled(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        # Marked at once, so nothing scheduled earlier in the same step is picked as a preemption victim.
        seq.in_flight = True
        return ScheduledSeq(seq, seq.num_computed_tokens, num_new_tokens)

    def preempt(self, seq: Sequence) -> None:
        """Give back the blocks of running, not in-flight `seq`: swap its KV out to the host tier (see
        `preemption_mode`), or drop it (it stays in the prefix cache until evicted, and goes to the host
        tier if there is one) and requeue it at the front to recompute, so it resumes before newer ones."""
        assert not seq.in_flight, "cannot preempt a sequence whose batch is running"
        if self._swaps(seq) and self.bm.swap_out(seq):
            self.running.remove(seq)
            seq.status = SequenceStatus.SWAPPED
            seq.num_preemptions += 1
            self.num_preemptions += 1
            self.num_swap_preemptions += 1
            # In arrival order: the oldest comes back first.
            i = len(self.swapped)
            while i and self.swapped[i - 1].times.arrival > seq.times.arrival:
                i -= 1
            self.swapped.insert(i, seq)
            return
        seq.num_dropped_tokens = seq.num_computed_tokens
        self.release(seq)
        self.requeue(seq)

    def _swaps(self, seq: Sequence) -> bool:
        mode = self.config.preemption_mode
        if mode == "recompute" or self.bm.host is None or not seq.num_computed_tokens:
            return False
        if mode == "swap":
            return True
        return self.swap_costs.prefers_swap(
            self.bm.blocks_needed(seq.num_computed_tokens), seq.num_computed_tokens
        )

    def resume_swapped(self) -> None:
        """Start copying swapped-out sequences back, oldest first, while sequence slots and blocks (above the
        watermark and the running requests' growth this step) last; they run once their copies are done
        (`copies_done`). The oldest one that cannot come back blocks new admissions until it can."""
        self.admission_blocked = False
        # Room for what the running requests claim this step comes first: a request brought back into it
        # would be the newest running one, the first to be preempted again.
        bm = self.bm
        growth = sum(max(0, bm.blocks_needed(s.num_tokens) - len(s.block_table)) for s in self.running)
        while self.swapped and self.num_active < self.config.max_num_seqs:
            seq = self.swapped[0]
            if self._yields_to_waiting(seq):
                return
            # ... and for its own next token, or it would only come back to preempt itself.
            own = bm.blocks_needed(seq.num_tokens) - len(seq.host_block_table)
            ticket = bm.swap_in(seq, reserve=self.admission_reserve + growth + max(own, 0))
            if ticket is None:
                self.admission_blocked = True
                return
            self.swapped.popleft()
            if not ticket:  # the device held all its KV still
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                self.bm.register_full_blocks(seq)
                continue
            seq.in_flight = True  # nothing may run or free it before its KV is back
            self.resuming.setdefault(ticket, []).append(seq)
            self.num_resuming += 1

    def _yields_to_waiting(self, seq: Sequence) -> bool:
        """With fairness, a swapped-out request of a client served `fairness_preempt_gap` more than the oldest
        waiting request's client stays out until that one started: it may have been preempted for it, and
        coming back first would only get it preempted again."""
        vtc = self.vtc
        if vtc is None or not self.waiting:
            return False
        head = self.waiting[0]
        gap = self.config.fairness_preempt_gap
        return vtc.counter(seq.slo.client) > vtc.counter(head.slo.client) + gap

    def copies_done(self, ticket: int) -> list[Sequence]:
        """A submission of copies landed: free what it held, and run the sequences it brought back. Returns
        those that were aborted meanwhile (now finished)."""
        self.bm.copies_done(ticket)
        ended: list[Sequence] = []
        for seq in self.resuming.pop(ticket, ()):
            self.num_resuming -= 1
            seq.in_flight = False
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.abort_pending:
                self._retire(seq)
                ended.append(seq)
            else:
                self.bm.register_full_blocks(seq)
        return ended

    def preempt_for_fairness(self) -> None:
        """VTC with preemption (FastSwitch's priority adjustment): when the oldest request of the least-served
        waiting client cannot start (no sequence slot, or no blocks for its first chunk) and a running
        request's client was served `fairness_preempt_gap` weighted tokens more, preempt that request (the
        newest of the most-served client's). One per step, so a swap's copies can overlap the next."""
        vtc, seq = self.vtc, self.waiting[0]
        assert vtc is not None
        if self.admission_blocked:  # a swapped-out request comes back first: nothing could start anyway
            return
        first = min(seq.num_tokens, self.config.max_num_batched_tokens)
        bm, hit = self.bm, self.bm.lookup_prefix(seq)
        reserve = self.admission_reserve
        if self.num_active < self.config.max_num_seqs and bm.can_allocate(seq, first, hit, reserve=reserve):
            return
        floor = vtc.counter(seq.slo.client) + self.config.fairness_preempt_gap
        victims = [
            s
            for s in self.running
            if not s.in_flight and s.slo.priority >= seq.slo.priority and vtc.counter(s.slo.client) > floor
        ]
        if victims:
            top = max(vtc.counter(s.slo.client) for s in victims)
            victim = [s for s in victims if vtc.counter(s.slo.client) == top][-1]
            # Only when its blocks (those no one else holds) let the waiting request start: otherwise the
            # preemption costs the victim its progress and helps no one.
            freed = sum(1 for b in victim.block_table if bm.blocks[b].ref_count == 1)
            if not bm.can_allocate(seq, first, hit, reserve=reserve - freed):
                return
            self.preempt(victim)
            self.num_fairness_preemptions += 1
            self.order_waiting()  # a recomputing victim was requeued at the front: it waits its turn

    # ---- sequences that move between instances (migration, disaggregated hand-off) ----------------------
    def adopt(self, seq: Sequence, *, reserved: bool = False) -> bool:
        """Make `seq`, arriving with the KV of its first `num_computed_tokens` tokens computed elsewhere (a
        migrated or handed-off sequence), the newest running sequence. It gets blocks for that KV here and
        must hold none; False, changing nothing, when every sequence slot is taken or the pool cannot hold
        it. `reserved`: its blocks were allocated here, and its sequence slot counted, when its transfer
        started (the slots the transfer wrote into), so it joins as it is."""
        assert not seq.in_flight and seq.status is not SequenceStatus.FINISHED
        if reserved:
            assert len(seq.block_table) * self.bm.block_size >= seq.num_computed_tokens, "KV without blocks"
        else:
            assert not seq.block_table, "an adopted sequence brings no blocks of this pool"
            if len(self.running) >= self.config.max_num_seqs or not self.bm.allocate(seq, 0):
                return False
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def release(self, seq: Sequence) -> None:
        """Take running, not in-flight `seq` off this scheduler unfinished (its KV was copied out, it goes on
        elsewhere): it leaves the running and its blocks are freed (full ones stay in the prefix cache until
        evicted). Its progress and status are kept for whoever takes it next (`adopt`, `requeue`)."""
        assert not seq.in_flight and seq.status is SequenceStatus.RUNNING, f"{seq} is not running idle"
        self.running.remove(seq)
        self.bm.free_seq(seq)

    def requeue(self, seq: Sequence) -> None:
        """Queue `seq`, in neither queue here, at the front of waiting to recompute its KV, counted as a
        preemption: a preempted sequence once `release`d, or one arriving with its KV when this pool cannot
        hold it. Any blocks it holds here are freed."""
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def grow_or_preempt(
        self, seq: Sequence, num_new_tokens: int, preempted: list[Sequence]
    ) -> ScheduledSeq | None:
        """Find room for `seq` to compute `num_new_tokens` more, preempting the newest running sequences
        (never in-flight ones, which includes everything already scheduled this step) until it fits;
        preempts `seq` itself when nothing else can go."""
        while True:
            item = self.try_grow(seq, num_new_tokens)
            if item is not None:
                return item
            victims = [s for s in self.running if s is not seq and not s.in_flight]
            if not victims:
                self.preempt(seq)
                preempted.append(seq)
                return None
            victim = victims[-1]
            self.preempt(victim)
            preempted.append(victim)

    # ---- completion ------------------------------------------------------------------------------------
    def on_batch_done(self, batch: Batch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance KV progress, append sampled tokens (keyed by seq_id), finish sequences that stop.
        Returns the sequences that advanced (finished ones included)."""
        touched: list[Sequence] = []
        touch, get = touched.append, sampled.get
        register = self.bm.register_full_blocks if self.bm.enable_prefix_caching else None
        finished = SequenceStatus.FINISHED
        vtc = self.vtc
        for item in batch.items:
            seq = item.seq
            seq.in_flight = False
            if seq.status is finished:
                continue
            seq.num_computed_tokens = item.start + item.num_new_tokens
            if register is not None:
                register(seq)
            if seq.abort_pending:
                self._retire(seq)
                touch(seq)
                continue
            token = get(seq.seq_id)
            if token is not None:
                token_ids = seq.token_ids
                token_ids.append(token)
                if vtc is not None:
                    vtc.charge(seq.slo.client, output_tokens=1)
                # Unless a token can stop it, a sequence can only end at its length: no call before then.
                can_end = seq.stops_on_token or len(token_ids) - seq.num_prompt_tokens >= seq.max_tokens
                if can_end and seq.check_stop_token():
                    self._retire(seq)
            touch(seq)
        return touched

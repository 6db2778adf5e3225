"""The host KV tier and swap preemption in the block manager and scheduler, against a shadow KV store: every
block slot records which token it holds the KV of, copies move those records as the engine's copier moves
bytes, and every scheduled chunk must find the KV of all its earlier tokens in its blocks. Random operations
(hypothesis) never leak or double-free a block in either tier, and never let a sequence read KV that is not its
own."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_agent.core.block_manager import BlockManager
from drift_agent.core.kv_copies import CopyRun, KVCopies, coalesce
from drift_agent.core.policies import ChunkedPolicy, PrefillFirstPolicy
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.scheduler import Scheduler, SchedulerConfig
from drift_agent.core.sequence import FinishReason, Sequence, SequenceStatus


class ShadowKV:
    """What each device and host block slot holds: the (token id, position) its KV was computed for."""

    def __init__(self, bm: BlockManager) -> None:
        bs = bm.block_size
        self.bs = bs
        self.device = [[None] * bs for _ in range(bm.num_blocks)]
        self.host = [[None] * bs for _ in range(bm.num_host_blocks)]
        self.in_flight: list[KVCopies] = []

    def submit(self, copies: KVCopies | None) -> None:
        if copies is not None:
            self.in_flight.append(copies)

    def land(self, sched: Scheduler, count: int | None = None) -> None:
        """Apply the oldest `count` submissions (all by default) in order, and report them done."""
        n = len(self.in_flight) if count is None else min(count, len(self.in_flight))
        for copies in self.in_flight[:n]:
            for src, dst in copies.swap_out:
                self.host[dst] = list(self.device[src])
            for src, dst in copies.swap_in:
                self.device[dst] = list(self.host[src])
            sched.copies_done(copies.ticket)
        del self.in_flight[:n]

    def land_blocking(self, sched: Scheduler) -> None:
        """Before a forward pass: every submission up to the last blocking one (FIFO)."""
        last = max((i for i, c in enumerate(self.in_flight) if c.blocking), default=-1)
        self.land(sched, last + 1)

    def forward(self, seq: Sequence, start: int, end: int) -> None:
        bs, table = self.bs, seq.block_table
        for p in range(start):
            held = self.device[table[p // bs]][p % bs]
            assert held == (seq.token_ids[p], p), f"{seq}: position {p} reads KV of {held}"
        for p in range(start, end):
            self.device[table[p // bs]][p % bs] = (seq.token_ids[p], p)


def make(
    num_blocks: int, num_host_blocks: int, mode: str, policy: str = "chunked", budget: int = 32, bs: int = 4
) -> Scheduler:
    bm = BlockManager(num_blocks, bs, num_host_blocks=num_host_blocks)
    cfg = SchedulerConfig(block_size=bs, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=4096)
    cfg.preemption_mode = mode
    pol = ChunkedPolicy() if policy == "chunked" else PrefillFirstPolicy()
    return Scheduler(cfg, bm, pol)


def next_token(seq: Sequence) -> int:
    # Deterministic in the sequence's tokens: what a greedy model would do, so recomputing gives the same.
    return (sum(seq.token_ids) * 31 + len(seq.token_ids)) % 97 + 3


def run_step(sched: Scheduler, kv: ShadowKV, now: float) -> None:
    kv.land(sched, 1 if kv.in_flight else 0)  # async copies land one submission per step
    out = sched.schedule(now)
    kv.submit(sched.bm.take_copies())
    if out.is_empty:
        kv.land(sched)
        return
    kv.land_blocking(sched)
    for batch in out.batches:
        for item in batch.items:
            kv.forward(item.seq, item.start, item.end)
        sampled = {i.seq.seq_id: next_token(i.seq) for i in batch.items if i.samples}
        sched.on_batch_done(batch, sampled)


def drain(sched: Scheduler, kv: ShadowKV, limit: int = 5000) -> None:
    for step in range(limit):
        if not sched.has_unfinished and not kv.in_flight and sched.bm.pending.is_empty:
            return
        run_step(sched, kv, float(step))
        sched.check_invariants()
    raise AssertionError("no progress")


def seq(tokens: list[int], rid: str, out: int) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=out, ignore_eos=True))


def reference_outputs(prompts: list[list[int]], out: int) -> list[list[int]]:
    """Each request alone with plenty of blocks: what every schedule must produce."""
    results = []
    for i, p in enumerate(prompts):
        sched = make(256, 0, "recompute")
        s = seq(p, f"ref{i}", out)
        sched.add(s)
        drain(sched, ShadowKV(sched.bm))
        results.append(s.output_token_ids)
    return results


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto", "mixed"])
@pytest.mark.parametrize("policy", ["chunked", "prefill-first"])
def test_outputs_match_with_preemption_in_every_mode(mode: str, policy: str) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randint(6, 20))] for _ in range(6)]
    sched = make(14, 40, "swap" if mode == "mixed" else mode, policy)
    if mode == "mixed":
        flips = itertools.cycle([True, False, False, True, True])
        sched._swaps = lambda s: bool(s.num_computed_tokens) and next(flips)  # type: ignore[method-assign]
    if mode == "auto":
        sched.swap_costs.copy_s_per_block, sched.swap_costs.recompute_s_per_token = 1.0, 0.6
    kv = ShadowKV(sched.bm)
    seqs = [seq(p, f"r{i}", 16) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    drain(sched, kv)
    assert [s.output_token_ids for s in seqs] == reference_outputs(prompts, 16)
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert sched.num_swap_preemptions == sched.num_preemptions and sched.num_recomputed_tokens == 0
    if mode == "recompute":
        assert sched.num_swap_preemptions == 0 and sched.num_recomputed_tokens > 0
    if mode == "mixed":
        assert 0 < sched.num_swap_preemptions < sched.num_preemptions
    if mode == "auto":  # long victims swap (copying 2 x blocks costs less than tokens x 0.6)
        assert sched.num_swap_preemptions > 0
    bm = sched.bm
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks


def test_multi_turn_hits_the_host_tier_after_device_eviction() -> None:
    sched = make(12, 64, "recompute")
    kv = ShadowKV(sched.bm)
    turn1 = seq(list(range(3, 23)), "t1", 4)  # 20 prompt tokens: 5 full blocks
    sched.add(turn1)
    drain(sched, kv)
    # Another request takes every device block: turn 1's cached blocks are evicted there.
    sched.add(seq(list(range(50, 94)), "other", 4))
    drain(sched, kv)
    assert sched.bm.find_cached_prefix(seq(turn1.token_ids + [5], "probe", 1)) == []
    turn2 = seq(turn1.token_ids + [7, 8, 9], "t2", 4)
    sched.add(turn2)
    drain(sched, kv)
    assert turn2.num_cached_tokens == 20 and sched.bm.prefix_host_hits == 20
    assert sched.bm.promoted_blocks == 5
    assert turn2.output_token_ids == reference_outputs([turn2.prompt_token_ids], 4)[0]


def test_swapped_blocks_come_back_as_few_large_copies() -> None:
    sched = make(16, 32, "swap", budget=64)
    kv = ShadowKV(sched.bm)
    copies: list[KVCopies] = []
    take = sched.bm.take_copies

    def recording_take() -> KVCopies | None:
        c = take()
        if c is not None:
            copies.append(c)
        return c

    sched.bm.take_copies = recording_take  # type: ignore[method-assign]
    a, b = seq(list(range(3, 27)), "a", 12), seq(list(range(40, 64)), "b", 12)
    sched.add(a)
    sched.add(b)
    drain(sched, kv)
    pairs = [p for c in copies for p in (*c.swap_out, *c.swap_in)]
    runs = [r for c in copies for d in ("out", "in") for r in c.runs(d)]
    assert sched.num_swap_preemptions > 0 and pairs
    assert len(runs) * 2 <= len(pairs)  # contiguous groups: a copy moves two blocks or more on average


def test_coalesce_joins_only_consecutive_pairs() -> None:
    assert coalesce([(4, 10), (5, 11), (6, 12), (9, 13), (10, 14), (2, 20)]) == [
        CopyRun(4, 10, 3),
        CopyRun(9, 13, 2),
        CopyRun(2, 20, 1),
    ]
    assert coalesce([]) == []


def test_abort_while_swapped_or_resuming_frees_both_tiers() -> None:
    for land_first in (False, True):
        sched = make(10, 32, "swap", budget=64)
        kv = ShadowKV(sched.bm)
        seqs = [seq(list(range(10 * i + 3, 10 * i + 19)), f"r{i}", 20) for i in range(3)]
        for s in seqs:
            sched.add(s)
        for step in range(200):
            run_step(sched, kv, float(step))
            if sched.swapped or sched.num_resuming:
                break
        target = sched.swapped[0] if sched.swapped else next(iter(sched.resuming.values()))[0]
        if land_first:
            kv.land(sched)
        sched.finish(target, FinishReason.ABORT)
        drain(sched, kv)
        assert target.status is SequenceStatus.FINISHED
        bm = sched.bm
        assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks


def test_without_room_in_the_host_tier_swap_falls_back_to_recompute() -> None:
    sched = make(14, 1, "swap")
    kv = ShadowKV(sched.bm)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 90) for _ in range(rng.randint(8, 14))] for _ in range(4)]
    seqs = [seq(p, f"r{i}", 16) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    drain(sched, kv)
    assert sched.num_preemptions > sched.num_swap_preemptions
    assert [s.output_token_ids for s in seqs] == reference_outputs(prompts, 16)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=8),
    st.sampled_from(["recompute", "swap", "auto"]),
    st.integers(0, 24),
    st.integers(0, 2**16),
)
def test_random_workloads_keep_both_tiers_consistent(specs, mode, host_blocks, seed) -> None:
    """Random arrivals (sharing prefixes), aborts, swaps, demotions and promotions: invariants hold every step,
    every request reads only its own KV, and when all is done every block of both tiers is free."""
    rng = random.Random(seed)
    sched = make(12, host_blocks, mode, budget=16)
    sched.swap_costs.copy_s_per_block, sched.swap_costs.recompute_s_per_token = 1.0, rng.choice([0.1, 1.0])
    kv = ShadowKV(sched.bm)
    shared = [rng.randrange(3, 90) for _ in range(12)]
    pending = [
        seq(shared[: rng.randint(0, 12)] + [rng.randrange(3, 90) for _ in range(n)], f"r{i}", out)
        for i, (n, out, _) in enumerate(specs)
    ]
    live: list[Sequence] = []
    for step in range(3000):
        if pending and rng.random() < 0.4:
            s = pending.pop(0)
            sched.add(s)
            live.append(s)
        if live and rng.random() < 0.05:
            sched.finish(rng.choice(live), FinishReason.ABORT)
        run_step(sched, kv, float(step))
        sched.check_invariants()
        if not pending and not sched.has_unfinished and not kv.in_flight and sched.bm.pending.is_empty:
            break
    else:
        raise AssertionError("no progress")
    bm = sched.bm
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks

"""Block manager: allocation, prefix caching with verification, LRU eviction, and invariants under any
interleaving of scheduler operations (hypothesis)."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from drift_agent.core.block_manager import BlockManager
from drift_agent.core.policies import ChunkedPolicy, PrefillFirstPolicy
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.scheduler import Scheduler, SchedulerConfig
from drift_agent.core.sequence import FinishReason, Sequence


def seq(tokens: list[int], rid: str = "r", max_tokens: int = 8) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_allocate_and_free_returns_all_blocks():
    bm = BlockManager(8, 4)
    s = seq(list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    bm.check_invariants()


def test_allocate_is_all_or_nothing():
    bm = BlockManager(2, 4)
    s = seq(list(range(12)))
    assert not bm.allocate(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    bm = BlockManager(16, 4)
    a = seq(list(range(12)), "a")
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.register_full_blocks(a)
    b = seq(list(range(12)), "b")
    hits = bm.find_cached_prefix(b)
    # 12 tokens = 3 full blocks, but the last token must be recomputed, so only 2 blocks are reused.
    assert hits == a.block_table[:2]
    c = seq(list(range(8)) + [99, 98, 97, 96, 95], "c")
    assert bm.find_cached_prefix(c) == a.block_table[:2]
    d = seq([0, 1, 2, 7] + list(range(4, 12)), "d")
    assert bm.find_cached_prefix(d) == []


def test_hash_hit_is_verified_by_tokens():
    bm = BlockManager(8, 4)
    a = seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    # Corrupt the stored content: a lookup must not trust the hash alone.
    bm.blocks[a.block_table[0]].token_ids = (9, 9, 9, 9)
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 5], "b")) == []


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.register_full_blocks(a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 6], "b")
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    assert bm.allocate(b, 1, hits)
    assert bm.blocks[hits[0]].ref_count == 1 and bm.num_free_blocks == 1
    # Filling the pool evicts the remaining cached block and drops it from the index.
    bm.free_seq(b)
    c = seq(list(range(100, 108)), "c")
    assert bm.allocate(c, 8)
    assert bm.hash_to_block == {} or all(bm.blocks[b].ref_count for b in bm.hash_to_block.values())
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = seq(list(range(9)), "a")
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_full_blocks(a)
    assert bm.find_cached_prefix(seq(list(range(9)), "b")) == []


def fake_step(sched: Scheduler, rng: random.Random, vocab: int = 50) -> None:
    out = sched.schedule(0.0)
    for batch in out.batches:
        sampled = {i.seq.seq_id: rng.randrange(vocab) for i in batch.items if i.samples}
        sched.on_batch_done(batch, sampled)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(1, 3)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("finish"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, policy=st.sampled_from([PrefillFirstPolicy, ChunkedPolicy]), num_blocks=st.integers(6, 24))
def test_any_interleaving_keeps_blocks_consistent(ops, policy, num_blocks):
    rng = random.Random(0)
    bm = BlockManager(num_blocks, 4)
    cfg = SchedulerConfig(
        block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=num_blocks * 4
    )
    sched = Scheduler(cfg, bm, policy())
    seqs: list[Sequence] = []
    prefixes = [[7, 7, 7, 7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6]]
    for op in ops:
        if op[0] == "add":
            _, n, max_tokens, prefix = op
            toks = (prefixes[prefix - 1] if prefix else []) + [rng.randrange(50) for _ in range(n)]
            toks = toks[: cfg.max_model_len - 1]
            s = Sequence(
                f"r{len(seqs)}",
                toks,
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                max_model_len=cfg.max_model_len,
            )
            sched.add(s)
            seqs.append(s)
        elif op[0] == "step":
            for _ in range(op[1]):
                if sched.has_unfinished:
                    fake_step(sched, rng)
        elif seqs:
            s = seqs[op[1] % len(seqs)]
            sched.finish(s, FinishReason.ABORT if op[0] == "abort" else FinishReason.STOP)
        bm.check_invariants()
        refs = Counter(b for s in sched.running for b in s.block_table)
        assert all(b.ref_count == refs.get(b.block_id, 0) for b in bm.blocks)
        assert all(not s.block_table for s in sched.waiting)
    # Everything left runs to completion (progress is guaranteed) and returns every block.
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        fake_step(sched, rng)
    assert not sched.has_unfinished
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert all(s.is_finished for s in seqs)


def test_blocks_filled_while_decoding_are_published_after_a_prefix_hit():
    bm = BlockManager(16, 4)
    a = seq(list(range(9)), "a")
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_full_blocks(a)
    b = seq(list(range(9)), "b")
    hits = bm.find_cached_prefix(b)
    assert bm.allocate(b, 1, hits)
    b.num_computed_tokens = 9
    for t in (50, 51, 52):  # decode fills block 2 (tokens 8..11)
        b.token_ids.append(t)
        assert bm.allocate(b, 1)
        b.num_computed_tokens += 1
        bm.register_full_blocks(b)
    c = seq(list(range(9)) + [50, 51, 52, 53], "c")
    assert len(bm.find_cached_prefix(c)) == 3

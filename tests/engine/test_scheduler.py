"""Scheduling policies on the pure scheduler: batch shapes, budgets, preemption, rejection."""

from __future__ import annotations

import pytest

from drift_agent.core.block_manager import BlockManager
from drift_agent.core.errors import PromptTooLongError
from drift_agent.core.policies import ChunkedPolicy, PrefillFirstPolicy
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.scheduler import Scheduler, SchedulerConfig
from drift_agent.core.sequence import FinishReason, Sequence, SequenceStatus


def make(policy, num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=256):
    cfg = SchedulerConfig(block_size, max_seqs, budget, max_len)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), policy())


def seq(n: int, rid: str, max_tokens: int = 4, first: int = 0) -> Sequence:
    return Sequence(
        rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


def run_batch(sched, out, token=1):
    for b in out.batches:
        sched.on_batch_done(b, {i.seq.seq_id: token for i in b.items if i.samples})


def test_prefill_first_never_mixes_phases():
    sched = make(PrefillFirstPolicy)
    a = seq(6, "a")
    sched.add(a)
    run_batch(sched, sched.schedule(0))  # a prefilled, one token out
    sched.add(seq(6, "b", first=100))
    out = sched.schedule(0)
    assert [b.phase for b in out.batches] == ["prefill"]
    assert [i.seq.request_id for i in out.batches[0].items] == ["b"]
    run_batch(sched, out)
    out = sched.schedule(0)
    assert out.batches[0].phase == "decode" and {i.seq.request_id for i in out.batches[0].items} == {"a", "b"}


def test_prefill_first_chunks_only_an_oversized_first_prompt():
    sched = make(PrefillFirstPolicy, budget=16)
    sched.add(seq(40, "long"))
    sched.add(seq(4, "short", first=200))
    out = sched.schedule(0)
    items = out.batches[0].items
    assert [(i.seq.request_id, i.num_new_tokens) for i in items] == [("long", 16)]
    assert not items[0].samples
    run_batch(sched, out)
    out = sched.schedule(0)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.batches[0].items] == [("long", 16)]


def test_chunked_mixes_decodes_with_prefill_chunks_within_budget():
    sched = make(ChunkedPolicy, budget=10)
    a = seq(4, "a", max_tokens=10)
    sched.add(a)
    run_batch(sched, sched.schedule(0))
    sched.add(seq(30, "b", first=50))
    out = sched.schedule(0)
    batch = out.batches[0]
    assert batch.phase == "mixed"
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 1), ("b", 9)]
    assert batch.num_tokens <= 10
    run_batch(sched, out)
    # b continues its prefill next to a's decode until its prompt is done.
    out = sched.schedule(0)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.batches[0].items] == [("a", 1), ("b", 9)]


def test_max_num_seqs_bounds_running():
    sched = make(ChunkedPolicy, budget=100, max_seqs=2)
    for k in range(4):
        sched.add(seq(3, f"s{k}", first=10 * k))
    out = sched.schedule(0)
    assert len(out.batches[0].items) == 2 and sched.num_waiting == 2


@pytest.mark.parametrize("policy", [PrefillFirstPolicy, ChunkedPolicy])
def test_preemption_when_pool_runs_dry_then_everything_completes(policy):
    # 6 blocks of 4 tokens; three sequences that would need 3 blocks each at the end.
    sched = make(policy, num_blocks=6, block_size=4, budget=32)
    seqs = [seq(4, f"s{k}", max_tokens=8, first=20 * k) for k in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished:
            break
        out = sched.schedule(0)
        preempted += len(out.preempted)
        run_batch(sched, out)
    assert not sched.has_unfinished and preempted > 0
    assert all(s.num_output_tokens == 8 and s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert sched.bm.num_free_blocks == 6


def test_preempted_sequence_resumes_with_prefix_cache_hits():
    sched = make(ChunkedPolicy, num_blocks=4, block_size=4, budget=64)
    a = seq(8, "a", max_tokens=20)
    sched.add(a)
    run_batch(sched, sched.schedule(0))
    sched.preempt(a)
    assert a.status is SequenceStatus.WAITING and a.num_computed_tokens == 0
    out = sched.schedule(0)
    item = out.batches[0].items[0]
    assert item.start == 8 and item.num_new_tokens == 1  # its 2 full blocks were still cached


def test_prompt_too_long_is_rejected_at_add():
    sched = make(ChunkedPolicy, num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(PromptTooLongError, match="context window"):
        sched.add(seq(100, "x"))
    with pytest.raises(PromptTooLongError, match="KV pool"):
        sched.add(seq(16, "y"))


def test_abort_of_in_flight_sequence_waits_for_its_batch():
    sched = make(ChunkedPolicy)
    a = seq(5, "a")
    sched.add(a)
    out = sched.schedule(0)
    sched.finish(a, FinishReason.ABORT)
    assert not a.is_finished and a.abort_pending and a.block_table
    run_batch(sched, out)
    assert a.is_finished and a.finish_reason is FinishReason.ABORT and a.num_output_tokens == 0
    assert sched.bm.num_free_blocks == sched.bm.num_blocks


def test_stop_token_and_eos_finish():
    sched = make(ChunkedPolicy)
    s = Sequence(
        "a", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), eos_token_ids=frozenset({9})
    )
    sched.add(s)
    run_batch(sched, sched.schedule(0), token=7)
    assert s.is_finished and s.finish_reason is FinishReason.STOP and s.stop_reason == 7
    e = Sequence("b", [1, 2, 3], SamplingParams(max_tokens=10, min_tokens=2), eos_token_ids=frozenset({9}))
    sched.add(e)
    run_batch(sched, sched.schedule(0), token=9)
    assert not e.is_finished  # min_tokens not reached yet
    run_batch(sched, sched.schedule(0), token=9)
    assert e.is_finished and e.finish_reason is FinishReason.STOP


def test_only_the_length_ends_a_sequence_no_token_can_stop():
    # `on_batch_done` asks `check_stop_token` only of sequences a token can stop, or that reached their length.
    eos = frozenset({9})
    ignoring = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=eos)
    honouring = Sequence("b", [1, 2, 3], SamplingParams(max_tokens=3), eos_token_ids=eos)
    stop_ids = Sequence("c", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True, stop_token_ids=[9]))
    no_eos = Sequence("d", [1, 2, 3], SamplingParams(max_tokens=3))
    assert [s.stops_on_token for s in (ignoring, honouring, stop_ids, no_eos)] == [False, True, True, False]
    sched = make(ChunkedPolicy)
    for s in (ignoring, honouring, stop_ids, no_eos):
        sched.add(s)
    run_batch(sched, sched.schedule(0), token=9)
    assert honouring.finish_reason is FinishReason.STOP and stop_ids.stop_reason == 9
    assert not ignoring.is_finished and not no_eos.is_finished
    for _ in range(2):
        run_batch(sched, sched.schedule(0), token=9)
    assert ignoring.num_output_tokens == no_eos.num_output_tokens == 3
    assert ignoring.finish_reason is no_eos.finish_reason is FinishReason.LENGTH
    assert not sched.has_unfinished


def test_first_scheduled_is_stamped_by_the_prefill_and_decode_batches_are_not_visited():
    sched = make(ChunkedPolicy)
    a = seq(5, "a", max_tokens=4)
    sched.add(a)
    out = sched.schedule(1.0)
    assert a.times.first_scheduled == 1.0
    run_batch(sched, out)
    out = sched.schedule(2.0)
    assert out.batches[0].phase == "decode" and a.times.first_scheduled == 1.0
    # Its sequences were all stamped for their prefill, so a decode batch is skipped (once per step saved).
    a.times.first_scheduled = None
    Scheduler.stamp_scheduled(out.batches, 3.0)
    assert a.times.first_scheduled is None


def test_admission_leaves_the_watermark_free_while_sequences_run():
    # 100 blocks of 4 tokens, watermark 10%: with a sequence running, a new prompt may take the pool down to
    # 10 free blocks and no further; with nothing running, a prompt that needs the whole pool still starts.
    cfg = SchedulerConfig(4, 8, 4096, 1024, kv_watermark=0.1)
    sched = Scheduler(cfg, BlockManager(100, 4, enable_prefix_caching=False), PrefillFirstPolicy())
    big = seq(400 - 1, "whole-pool", max_tokens=1)
    sched.add(big)
    assert sched.admission_reserve == 0
    out = sched.schedule(0)
    assert [i.seq for i in out.batches[0].items] == [big] and sched.bm.num_free_blocks == 0
    run_batch(sched, out)  # one output token: it finishes and frees everything
    assert sched.bm.num_free_blocks == 100

    first, second, third = seq(200, "a", 8), seq(4 * 38, "b", 8, first=1000), seq(8, "c", 8, first=2000)
    for s in (first, second, third):
        sched.add(s)
    out = sched.schedule(0)  # 50 + 38 + 2 blocks: `c` leaves exactly the watermark free
    assert [i.seq.request_id for i in out.batches[0].items] == ["a", "b", "c"]
    assert sched.admission_reserve == 10 and sched.bm.num_free_blocks == 10
    run_batch(sched, out)
    blocker = seq(4, "d", 8, first=3000)
    sched.add(blocker)
    out = sched.schedule(0)  # `d` would eat into the watermark: the running sequences decode instead
    assert out.batches[0].phase == "decode" and blocker in sched.waiting


def test_waiting_queue_orders_by_priority_then_arrival():
    from drift_agent.core.sequence import SLO

    sched = make(PrefillFirstPolicy, budget=8, max_seqs=1)
    order = [("a", 0), ("b", 1), ("c", -1), ("d", 0), ("e", -1), ("f", 1)]
    for i, (rid, prio) in enumerate(order):
        s = seq(4, rid, first=10 * i)
        s.slo = SLO(priority=prio)
        sched.add(s)
    # Lower value first (vLLM's `priority`); FCFS within a priority.
    assert [s.request_id for s in sched.waiting] == ["c", "e", "a", "d", "b", "f"]
    out = sched.schedule(0)
    assert [i.seq.request_id for i in out.batches[0].items] == ["c"]


def _drain(sched) -> None:
    for _ in range(200):
        if not sched.has_unfinished:
            return
        run_batch(sched, sched.schedule(0))
    raise AssertionError("the scheduler did not drain")


def _prefilled(sched, n: int, rid: str, max_tokens: int = 6, first: int = 0) -> Sequence:
    """A sequence admitted and prefilled on `sched`, its first token out."""
    s = seq(n, rid, max_tokens=max_tokens, first=first)
    sched.add(s)
    run_batch(sched, sched.schedule(0))
    assert s.status is SequenceStatus.RUNNING and s.num_computed_tokens == n and s.num_output_tokens == 1
    return s


def test_release_then_adopt_moves_a_running_sequence_with_its_progress():
    src, dst = make(ChunkedPolicy, num_blocks=8), make(ChunkedPolicy, num_blocks=8)
    a = _prefilled(src, 9, "a")
    assert len(a.block_table) == 3 and src.bm.num_free_blocks == 5
    src.release(a)
    # It left the source: no queue holds it, every block is free again, its progress is kept.
    assert not src.has_unfinished and src.bm.num_free_blocks == 8 and not a.block_table
    assert a.num_computed_tokens == 9 and a.num_output_tokens == 1 and a.status is SequenceStatus.RUNNING
    assert src.num_preemptions == 0 and a.num_preemptions == 0
    src.check_invariants()
    assert dst.adopt(a)
    assert dst.running == [a] and len(a.block_table) == 3 and dst.bm.num_free_blocks == 5
    dst.check_invariants()
    out = dst.schedule(0)  # it decodes from its next token, no prefill again
    assert [(i.seq, i.start, i.num_new_tokens) for i in out.batches[0].items] == [(a, 9, 1)]
    run_batch(dst, out)
    _drain(dst)
    assert a.num_output_tokens == 6 and a.finish_reason is FinishReason.LENGTH
    assert dst.bm.num_free_blocks == 8
    dst.check_invariants()


def test_release_refuses_a_sequence_whose_batch_is_running():
    sched = make(ChunkedPolicy)
    a = _prefilled(sched, 5, "a")
    sched.schedule(0)  # its decode step is in flight
    with pytest.raises(AssertionError):
        sched.release(a)


def test_adopt_refuses_without_a_slot_or_room_and_changes_nothing():
    sched = make(ChunkedPolicy, num_blocks=8, max_seqs=2)
    held = _prefilled(sched, 13, "held", first=100)  # 4 blocks
    big = seq(20, "big")
    big.num_computed_tokens = 20  # its KV needs 5 blocks, 4 are free
    assert not sched.adopt(big)
    assert sched.running == [held] and not big.block_table and sched.bm.num_free_blocks == 4
    small = seq(4, "small", first=200)
    small.num_computed_tokens = 4
    assert sched.adopt(small) and sched.running == [held, small]
    other = seq(4, "other", first=300)
    other.num_computed_tokens = 4
    assert not sched.adopt(other)  # both sequence slots are taken
    assert not other.block_table and sched.bm.num_free_blocks == 3
    sched.check_invariants()


def test_adopt_reserved_joins_with_the_blocks_allocated_when_its_transfer_started():
    sched = make(ChunkedPolicy, num_blocks=8)
    a = seq(9, "a")
    a.token_ids.append(1)  # prefilled elsewhere, its first token out
    a.num_computed_tokens = 9
    assert sched.bm.allocate(a, 0)  # the slots the transfer writes into
    table = list(a.block_table)
    assert sched.adopt(a, reserved=True)
    assert sched.running == [a] and a.block_table == table and sched.bm.num_free_blocks == 5
    sched.check_invariants()
    _drain(sched)
    assert a.num_output_tokens == 4 and sched.bm.num_free_blocks == 8


def test_requeue_puts_a_sequence_first_for_recompute_and_counts_a_preemption():
    src, dst = make(ChunkedPolicy, num_blocks=8, budget=32), make(ChunkedPolicy, num_blocks=4)
    queued = seq(4, "queued", first=500)
    dst.add(queued)
    a = _prefilled(src, 17, "a")  # 5 blocks: more than `dst` has
    src.release(a)
    assert not dst.adopt(a)
    dst.requeue(a)
    assert list(dst.waiting) == [a, queued]  # ahead of the queue, as a preempted sequence
    assert a.status is SequenceStatus.WAITING and a.num_computed_tokens == 0 and not a.block_table
    assert a.num_preemptions == 1 and dst.num_preemptions == 1 and src.num_preemptions == 0
    assert dst.bm.num_free_blocks == 4
    dst.check_invariants()


def test_preempt_is_release_then_requeue():
    sched = make(ChunkedPolicy, num_blocks=8)
    a = _prefilled(sched, 9, "a")
    b = seq(4, "b", first=100)
    sched.add(b)
    sched.preempt(a)
    assert list(sched.waiting) == [a, b] and not sched.running
    assert a.num_computed_tokens == 0 and a.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.bm.num_free_blocks == 8  # its blocks freed (kept in the prefix cache until evicted)
    sched.check_invariants()
    _drain(sched)
    assert a.num_output_tokens == 6 and sched.bm.num_free_blocks == 8

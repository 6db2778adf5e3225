"""The multiplexed engine's two lanes (`mux_loop.MuxLanes`): decode steps run back to back under a prefill
block, the dispatcher decides only when the prefill lane is free, and the split changes only at a sync
point."""

from __future__ import annotations

from typing import Any

import pytest

from drift_agent.core.block_manager import BlockManager
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.scheduler import Scheduler, SchedulerConfig
from drift_agent.core.sequence import SLO, RequestTimes, Sequence
from drift_agent.multiplex.dispatcher import DecodeLoad, DecodeRequest, DispatcherConfig
from drift_agent.multiplex.mux_loop import MuxLanes
from drift_agent.multiplex.policies import MultiplexPolicy, MuxContext
from drift_agent.partition.base import Split

from .mux_synth import SynthModel

SPLITS = [Split(132, 0), Split(112, 20), Split(96, 36), Split(72, 60), Split(0, 132)]
TOKEN = 7


def make_lanes(
    tpot_s: float = 0.03, block_decode_steps: float = 1.0, prefix_caching: bool = True, **config: Any
) -> MuxLanes:
    model = SynthModel()
    ctx = MuxContext(model, SPLITS, model.num_layers)
    policy = MultiplexPolicy("drift", ctx, DispatcherConfig(block_decode_steps=block_decode_steps, **config))
    pool = BlockManager(2000, 16, enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_model_len=8192, default_slo=SLO(60.0, tpot_s)), pool, policy)
    return MuxLanes(sched)


def add(lanes: MuxLanes, rid: str, prompt: int, out: int, t: float = 0.0) -> Sequence:
    seq = Sequence(
        rid,
        [3 + i % 100 for i in range(prompt)],
        SamplingParams(max_tokens=out, ignore_eos=True),
        times=RequestTimes(arrival=t),
    )
    lanes.sched.add(seq)
    return seq


def tokens(batch) -> dict[int, int]:
    return {i.seq.seq_id: TOKEN for i in batch.items if i.samples}


def running_decodes(lanes: MuxLanes, n: int = 4) -> list[Sequence]:
    """`n` short requests prefilled (alone: all layers at once) and now decoding."""
    seqs = [add(lanes, f"d{i}", 16, 50) for i in range(n)]
    launch = lanes.launch(0.0)
    assert launch.decision.mode == "prefill-only" and launch.decode is None
    assert launch.prefill_layers == launch.prefill.num_layers
    _, advanced = lanes.prefill_done(tokens(launch.prefill.batch))
    assert advanced == seqs and all(s.num_output_tokens == 1 for s in seqs)
    return seqs


def test_decode_steps_run_back_to_back_under_a_prefill_block() -> None:
    lanes = make_lanes()
    seqs = running_decodes(lanes)
    add(lanes, "long", 1200, 4)
    sync = lanes.launch(0.01)  # both lanes free: one decision for both
    assert sync.decision.mode == "multiplex" and sync.split.is_mixed
    assert sync.decode is not None and sync.decode.num_seqs == 4
    job = sync.prefill
    assert job is not None and 1 <= sync.prefill_layers < job.num_layers
    decisions = lanes.policy.dispatcher.prefill_stall_steps, lanes.policy.last_decision
    for step in range(3):  # the prefill block is still in flight: decode goes on, nobody decides
        lanes.decode_done(tokens(lanes.decode))
        again = lanes.launch(0.02 + step * 0.01)
        assert again.output is None and again.decode is not None and again.prefill is None
        assert again.split == sync.split and lanes.prefill is job
    assert (lanes.policy.dispatcher.prefill_stall_steps, lanes.policy.last_decision) == decisions
    assert all(s.num_output_tokens == 4 for s in seqs) and job.layers_done == 0
    # The block completes while a decode step is in flight: the dispatcher keeps the split and the next
    # block launches at once, beside the running decode step.
    _, advanced = lanes.prefill_done({})
    assert advanced == [] and job.layers_done == sync.prefill_layers
    nxt = lanes.launch(0.06)
    assert nxt.decision is not None and nxt.decode is None
    assert nxt.prefill is job and nxt.split == sync.split
    # Run the job to its end: its request joins the decode batch at the next decode launch.
    while job.layers_done + lanes.prefill_layers < job.num_layers:
        lanes.prefill_done({})
        lanes.decode_done(tokens(lanes.decode))
        assert lanes.launch(0.07).prefill is job  # both lanes free: next block and decode step together
    lanes.decode_done(tokens(lanes.decode))
    _, advanced = lanes.prefill_done(tokens(job.batch))
    assert [s.request_id for s in advanced] == ["long"] and advanced[0].num_output_tokens == 1
    last = lanes.launch(0.1)
    assert {i.seq.request_id for i in last.decode.items} == {"d0", "d1", "d2", "d3", "long"}


def test_split_change_waits_for_the_sync_point() -> None:
    lanes = make_lanes()
    running_decodes(lanes)
    add(lanes, "long", 1200, 4)
    sync = lanes.launch(0.01)
    wanted = sync.split
    # Pretend the lanes had been running on another mixed split: the decision made when the block ends
    # wants a different one, so it is taken back and the prefill lane waits for the decode step.
    other = next(s for s in SPLITS if s.is_mixed and s != wanted)
    lanes.split = other
    lanes.prefill_done({})
    job = lanes.policy.active
    layers_before, waiting_before = job.layers_done, list(lanes.sched.waiting)
    add(lanes, "short", 32, 4)
    deferred = lanes.launch(0.02)
    assert deferred.output.deferred and deferred.decision_taken is None and not deferred.started
    assert lanes.prefill is None and lanes.split == other
    assert job.layers_done == layers_before and lanes.policy.active is job
    assert [s.request_id for s in lanes.sched.waiting] == [s.request_id for s in waiting_before] + ["short"]
    # The decode step ends: both lanes are free, and the new split takes effect for both.
    lanes.decode_done(tokens(lanes.decode))
    resumed = lanes.launch(0.03)
    assert resumed.split == wanted == lanes.split
    assert resumed.decode is not None and resumed.prefill is job


def test_a_decision_taken_back_does_not_count_as_a_stalled_step() -> None:
    # A TPOT target no mixed split can meet (no slack to borrow): the dispatcher runs decode alone and counts
    # stalled steps.
    lanes = make_lanes(tpot_s=0.004, max_slack_borrow=1.0)
    running_decodes(lanes)
    add(lanes, "long", 1200, 4)
    first = lanes.launch(0.01)
    assert first.decision.mode == "decode-first" and first.prefill is None
    assert lanes.policy.dispatcher.prefill_stall_steps == 1
    # Asked again while the decode step is in flight (as after a prefill block), the decision launches no
    # prefill, so it is taken back and the count stays.
    out = lanes.policy.schedule(lanes.sched, 0.012, decode_busy=True, split=lanes.split)
    assert out.deferred and out.decision.mode == "decode-first"
    assert lanes.policy.dispatcher.prefill_stall_steps == 1
    lanes.decode_done(tokens(lanes.decode))
    lanes.launch(0.02)
    assert lanes.policy.dispatcher.prefill_stall_steps == 2


def test_decode_load_matches_the_dispatchers_definition() -> None:
    """The policy sums the running batch in one inlined pass; it must equal `DecodeLoad.of` over the
    `DecodeRequest`s (step budgets by each request's TPOT target, slack, borrow cap and catch-up floor)."""
    lanes = make_lanes(tpot_s=0.03)
    seqs = running_decodes(lanes, n=5)
    for k, seq in enumerate(seqs):
        seq.token_ids.extend([TOKEN] * k)  # different lengths; computed KV trails by one as when decoding
        seq.num_computed_tokens = len(seq.token_ids) - 1
        seq.times.first_token = 0.01 * k
        if k % 2:
            seq.slo.tpot = 0.02 * k
    seqs[-1].num_computed_tokens = 0  # back to prefilling (as after a preemption): not in the batch
    seqs = seqs[:-1]
    now = 0.12
    cfg = lanes.policy.dispatcher.config
    requests = [
        DecodeRequest(
            s.request_id,
            s.num_tokens,
            s.slo.tpot or 0.03,
            s.num_output_tokens - 1,
            now - s.times.first_token,
        )
        for s in seqs
    ]
    expected = DecodeLoad.of(requests, cfg.max_slack_borrow)
    got = lanes.policy._decode_load(lanes.sched.running, now)
    assert (got.batch, got.kv_tokens) == (expected.batch, expected.kv_tokens)
    assert got.step_budget_s == pytest.approx(expected.step_budget_s, rel=1e-12)


def test_dispatcher_sees_only_requests_a_free_slot_can_take() -> None:
    """Requests beyond the free sequence slots wait for decodes to finish, not for prefill: the dispatcher is
    offered only as many as there are slots, and told the queue is slot-bound."""
    model = SynthModel()
    ctx = MuxContext(model, SPLITS, model.num_layers)
    policy = MultiplexPolicy("drift", ctx, DispatcherConfig())
    config = SchedulerConfig(max_model_len=8192, max_num_seqs=3, default_slo=SLO(60.0, 0.03))
    sched = Scheduler(config, BlockManager(2000, 16), policy)
    lanes = MuxLanes(sched)
    seen = []
    decide = policy.dispatcher.decide
    policy.dispatcher.decide = lambda st: seen.append(st) or decide(st)  # type: ignore[method-assign]
    for i in range(5):
        add(lanes, f"r{i}", 16, 50)
    launch = lanes.launch(0.0)
    assert [r.request_id for r in seen[-1].waiting] == ["r0", "r1", "r2"] and seen[-1].slot_bound
    assert [i.seq.request_id for i in launch.prefill.batch.items] == ["r0", "r1", "r2"]
    lanes.prefill_done(tokens(launch.prefill.batch))
    lanes.launch(0.1)
    assert seen[-1].waiting == [] and seen[-1].slot_bound


def test_a_folded_prompt_runs_inside_the_decode_step_and_then_decodes() -> None:
    lanes = make_lanes()
    seqs = running_decodes(lanes)
    short = add(lanes, "short", 40, 3, t=0.01)
    launch = lanes.launch(0.01)
    assert launch.decision.mode == "fold" and launch.prefill is None and launch.new_job is None
    batch = launch.decode
    assert batch is lanes.decode and batch.phase == "mixed" and lanes.policy.active is None
    assert [i.seq for i in batch.items] == [*seqs, short]  # decodes first, then the whole prompt
    folded = batch.items[-1]  # the whole prompt past its cached prefix (it shares a block with the others)
    assert (folded.start, folded.num_new_tokens) == (16, 24) and short.times.first_scheduled == 0.01
    assert not lanes.sched.waiting
    _, advanced = lanes.decode_done(tokens(batch))
    assert advanced == [*seqs, short] and short.num_output_tokens == 1 and not short.is_prefilling
    nxt = lanes.launch(0.02)
    assert nxt.decision.mode == "decode-only" and nxt.decode.phase == "decode"
    assert [i.seq for i in nxt.decode.items] == [*seqs, short]
    # Off (fold_max_tokens=0), the same prompt is a prefill job on its own lane.
    lanes = make_lanes(fold_max_tokens=0)
    running_decodes(lanes)
    add(lanes, "short", 40, 3, t=0.01)
    launch = lanes.launch(0.01)
    assert (
        launch.decision.mode == "multiplex" and launch.prefill is not None and launch.decode.phase == "decode"
    )


def test_fold_setting_follows_the_partition_config_at_run_time() -> None:
    from drift_agent.core.config import EngineConfig

    lanes = make_lanes()
    assert lanes.policy.dispatcher.config.fold_max_tokens == 2048
    lanes.policy.reconfigure(EngineConfig(policy="drift", partition={"fold_max_tokens": 0}))
    assert lanes.policy.dispatcher.config.fold_max_tokens == 0


@pytest.mark.parametrize("caching", [False, True])
def test_waiting_requests_are_built_once_until_their_tokens_change(caching: bool) -> None:
    lanes = make_lanes(prefix_caching=caching)
    policy, sched = lanes.policy, lanes.sched
    seq = add(lanes, "w", 100, 4)
    first = policy._prefill_requests(sched, [seq])[0]
    assert (first.new_tokens, first.kv_blocks) == (100, 7)
    again = policy._prefill_requests(sched, [seq])[0]
    assert again == first and (again is first) is not caching  # a prefix cache can change between decisions
    seq.token_ids += [TOKEN] * 20  # a preempted request returns with its output tokens
    grown = policy._prefill_requests(sched, [seq])[0]
    assert (grown.new_tokens, grown.kv_blocks) == (120, 8)

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_agent.core.config import PartitionConfig
from drift_agent.multiplex.dispatcher import (
    DecodeLoad,
    DecodeRequest,
    Dispatcher,
    DispatcherConfig,
    DispatchState,
    InFlightPrefill,
    PrefillAction,
    PrefillRequest,
)
from drift_agent.multiplex.perf_model import PrefillShape
from drift_agent.multiplex.policies import dispatcher_config
from drift_agent.partition import Split, candidate_splits
from tests.multiplex.mux_synth import SynthModel

SPLITS = candidate_splits(132, 8, 8)  # (132,0), (112,20) … (72,60), (0,132)
MIXED = [s for s in SPLITS if s.is_mixed]


def running(requests: list[DecodeRequest]) -> DecodeLoad:
    return DecodeLoad.of(requests, DispatcherConfig().max_slack_borrow)


def decodes(n: int, tpot: float = 0.03, ctx: int = 1024) -> DecodeLoad:
    return running([DecodeRequest(f"d{i}", ctx, tpot) for i in range(n)])


def req(rid: str, tokens: int, deadline: float, blocks: int = 8, arrival: float = 0.0, cached: int = 0):
    return PrefillRequest(rid, tokens, cached, arrival, deadline, blocks)


def state(**kw) -> DispatchState:
    kw.setdefault("now_s", 0.0)
    kw.setdefault("splits", SPLITS)
    kw.setdefault("free_kv_blocks", 10_000)
    return DispatchState(**kw)


def test_decode_only_gets_whole_device() -> None:
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(8)))
    assert d.split == Split(0, 132) and d.mode == "decode-only" and d.run_decode
    assert d.prefill_action is PrefillAction.NONE and d.prefill_layers == 0
    assert d.predicted_decode_step_s == pytest.approx(SynthModel().decode_time(8, 8 * 1024, 132))


def test_prefill_only_gets_whole_device_and_all_layers() -> None:
    d = Dispatcher(SynthModel()).decide(state(waiting=[req("a", 1000, 5.0)]))
    assert d.split == Split(132, 0) and d.mode == "prefill-only" and not d.run_decode
    assert d.prefill_action is PrefillAction.LAUNCH and d.launch_ids == ("a",)
    assert d.prefill_layers == 10
    assert d.predicted_prefill_remaining_s == pytest.approx(0.1)
    assert d.predicted_ttft_s == {"a": pytest.approx(0.1)}


def test_idle() -> None:
    d = Dispatcher(SynthModel()).decide(state())
    assert d.mode == "idle" and not d.run_decode and d.prefill_action is PrefillAction.NONE


@pytest.mark.parametrize("tpot", [0.012, 0.015, 0.02, 0.03, 0.05])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_chooses_smallest_decode_share_meeting_tpot(tpot: float, batch: int) -> None:
    model = SynthModel()
    d = Dispatcher(model).decide(state(decode=decodes(batch, tpot), waiting=[req("a", 2000, 10.0)]))
    feasible = [
        s for s in MIXED if model.decode_time(batch, batch * 1024, s.decode_sms, contended=True) <= tpot
    ]
    if feasible:
        best = min(feasible, key=lambda s: s.decode_sms)
        assert d.mode == "multiplex" and d.split == best
        assert d.tpot_ok and d.predicted_decode_step_s <= tpot
        smaller = [s for s in MIXED if s.decode_sms < best.decode_sms]
        for s in smaller:  # every smaller share would miss the TPOT
            assert model.decode_time(batch, batch * 1024, s.decode_sms, contended=True) > tpot
    else:
        assert d.mode == "decode-first"


def test_decode_share_grows_with_tighter_tpot_and_bigger_batch() -> None:
    model = SynthModel()
    shares = []
    for tpot in (0.05, 0.03, 0.02, 0.015):
        d = Dispatcher(model).decide(state(decode=decodes(16, tpot), waiting=[req("a", 500, 10.0)]))
        shares.append(d.split.decode_sms)
    assert shares == sorted(shares) and shares[0] < shares[-1]
    by_batch = [
        Dispatcher(model)
        .decide(state(decode=decodes(b, 0.02), waiting=[req("a", 500, 10.0)]))
        .split.decode_sms
        for b in (1, 32, 64)
    ]
    assert by_batch == sorted(by_batch)


def test_contention_factor_is_applied() -> None:
    # Without contention (factor 1) the same load fits a smaller decode share.
    tight = Dispatcher(SynthModel(decode_slowdown=1.5)).decide(
        state(decode=decodes(16, 0.02), waiting=[req("a", 500, 9)])
    )
    loose = Dispatcher(SynthModel(decode_slowdown=1.0)).decide(
        state(decode=decodes(16, 0.02), waiting=[req("a", 500, 9)])
    )
    assert tight.split.decode_sms > loose.split.decode_sms


def test_slack_lets_ahead_requests_borrow_and_late_ones_catch_up() -> None:
    cfg = DispatcherConfig(max_slack_borrow=2.0)
    ahead = [
        DecodeRequest("x", 1024, 0.02, tokens_since_first=100, time_since_first_token_s=1.0)
    ]  # avg 10 ms
    late = [DecodeRequest("x", 1024, 0.02, tokens_since_first=100, time_since_first_token_s=2.005)]
    on_time = [DecodeRequest("x", 1024, 0.02)]
    w = [req("a", 500, 9.0)]
    budget = {}
    share = {}
    for name, dec in (("ahead", ahead), ("late", late), ("on_time", on_time)):
        d = Dispatcher(SynthModel(), cfg).decide(state(decode=DecodeLoad.of(dec, 2.0), waiting=w))
        budget[name], share[name] = d.decode_budget_s, d.split.decode_sms
    assert budget["ahead"] == pytest.approx(0.04)  # capped at 2 x target
    assert budget["on_time"] == pytest.approx(0.02)
    assert budget["late"] == pytest.approx(0.02 * 101 - 2.005)  # must catch up: 15 ms
    assert share["ahead"] <= share["on_time"] <= share["late"]
    floor = DecodeRequest("x", 1024, 0.02, 10, 100.0).step_budget(1.0)
    assert floor == pytest.approx(0.01)  # hopelessly late: floored at half the target


def test_prefills_launch_earliest_deadline_first() -> None:
    w = [
        req("late", 100, 3.0, arrival=0.0),
        req("soon", 100, 1.0, arrival=0.2),
        req("mid", 100, 2.0, arrival=0.1),
    ]
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(4), waiting=w))
    assert d.launch_ids == ("soon", "mid", "late")
    tie = [req("b", 100, 1.0, arrival=0.2), req("a", 100, 1.0, arrival=0.1)]
    assert Dispatcher(SynthModel()).decide(state(waiting=tie)).launch_ids == ("a", "b")


def test_hopeless_requests_go_last() -> None:
    # "doomed" cannot make its deadline even alone on the whole GPU (1000 tokens = 0.1 s).
    w = [req("doomed", 1000, 0.05), req("ok", 100, 1.0)]
    dispatcher = Dispatcher(SynthModel())
    d = dispatcher.decide(state(waiting=w))
    assert d.launch_ids == ("ok", "doomed")
    # The second decision reads each request's time alone from the memo: the same order.
    assert dispatcher.decide(state(waiting=w)).launch_ids == ("ok", "doomed")
    # Within a priority only: a lower priority goes first even when it is hopeless.
    first = PrefillRequest("doomed", 1000, 0, 0.0, 0.05, 8, priority=-1)
    assert dispatcher.decide(state(waiting=[first, w[1]])).launch_ids == ("doomed", "ok")


def test_head_of_line_blocks_on_kv_and_decode_gets_everything() -> None:
    w = [req("big", 100, 1.0, blocks=500), req("small", 100, 2.0, blocks=1)]
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(4), waiting=w, free_kv_blocks=100))
    assert d.launch_ids == () and d.split == Split(0, 132) and d.mode == "decode-only"
    assert "no prefill can start" in d.reason


def test_token_budget_and_batch_cap() -> None:
    cfg = DispatcherConfig(max_prefill_tokens=1000, max_prefill_batch=3)
    w = [req(f"r{i}", 400, 10.0 + i) for i in range(5)]
    d = Dispatcher(SynthModel(), cfg).decide(state(waiting=w))
    assert d.launch_ids == ("r0", "r1")  # 800 tokens; a third would exceed 1000
    small = [req(f"r{i}", 10, 10.0 + i) for i in range(5)]
    assert len(Dispatcher(SynthModel(), cfg).decide(state(waiting=small)).launch_ids) == 3
    long_alone = Dispatcher(SynthModel(), cfg).decide(state(waiting=[req("huge", 5000, 10.0), *small]))
    assert long_alone.launch_ids == ("huge",)  # a prompt over the budget still runs, alone


def test_batch_does_not_push_picked_request_past_deadline() -> None:
    # "tight" alone takes 0.01 s; adding 2000 tokens (0.2 s) would miss its 0.05 s deadline.
    w = [req("tight", 100, 0.05), req("bulk", 2000, 5.0)]
    d = Dispatcher(SynthModel()).decide(state(waiting=w))
    assert d.launch_ids == ("tight",)
    # A request that cannot meet its TTFT anyway is not protected: the batch grows past its deadline.
    late = [req("late", 100, 0.005), req("later", 2000, 0.006)]
    assert Dispatcher(SynthModel()).decide(state(waiting=late)).launch_ids == ("late", "later")


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(st.integers(1, 64), min_size=0, max_size=12),
    tokens=st.lists(st.integers(1, 4000), min_size=12, max_size=12),
    deadlines=st.lists(st.floats(0.01, 20.0), min_size=12, max_size=12),
    free=st.integers(0, 200),
    batch=st.integers(0, 64),
)
def test_never_overcommits_kv(blocks, tokens, deadlines, free, batch) -> None:
    w = [req(f"r{i}", tokens[i], deadlines[i], blocks=b) for i, b in enumerate(blocks)]
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(batch), waiting=w, free_kv_blocks=free))
    by_id = {r.request_id: r for r in w}
    assert sum(by_id[i].kv_blocks for i in d.launch_ids) <= free
    assert len(set(d.launch_ids)) == len(d.launch_ids)
    assert d.split in SPLITS
    if batch and d.run_decode and d.mode == "multiplex":
        assert d.tpot_ok


@pytest.mark.parametrize("steps", [1.0, 4.0])
def test_layer_blocks_are_about_block_decode_steps(steps: float) -> None:
    model = SynthModel()
    cfg = DispatcherConfig(block_decode_steps=steps)
    d = Dispatcher(model, cfg).decide(state(decode=decodes(16), waiting=[req("a", 1200, 10.0)]))
    assert d.mode == "multiplex" and d.prefill_action is PrefillAction.LAUNCH
    assert 1 <= d.prefill_layers < model.num_layers
    assert d.predicted_prefill_block_s <= steps * d.predicted_decode_step_s
    one_more = model.prefill_layers_time(
        PrefillShape(1200), d.split.prefill_sms, 0, d.prefill_layers + 1, contended=True
    )
    assert one_more > steps * d.predicted_decode_step_s
    two = Dispatcher(model, DispatcherConfig(block_decode_steps=2 * steps)).decide(
        state(decode=decodes(16), waiting=[req("a", 1200, 10.0)])
    )
    assert two.prefill_layers >= d.prefill_layers


def test_at_least_one_layer_even_if_a_layer_exceeds_a_step() -> None:
    d = Dispatcher(SynthModel(per_token_s=1e-2)).decide(
        state(decode=decodes(4), waiting=[req("a", 4000, 1e4)])
    )
    assert d.prefill_layers == 1


def _flight(layers_done: int, tokens: int, deadline: float) -> InFlightPrefill:
    return InFlightPrefill(("long",), (PrefillShape(tokens),), layers_done, deadline)


def test_continue_in_flight_next_block() -> None:
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(16), in_flight=_flight(4, 4000, 100.0)))
    assert d.prefill_action is PrefillAction.CONTINUE and d.launch_ids == ()
    assert 1 <= d.prefill_layers <= 6
    assert set(d.predicted_ttft_s) == {"long"}


def test_short_prefill_overtakes_when_long_still_meets_ttft() -> None:
    # Long: 20000 tokens, 0 layers done -> ~2 s alone on the whole GPU; deadline far away.
    long = _flight(0, 20000, 100.0)
    short = req("short", 200, 0.5)  # would miss 0.5 s if it waited ~2 s; alone it takes ~0.02 s
    d = Dispatcher(SynthModel()).decide(state(waiting=[short], in_flight=long))
    assert d.prefill_action is PrefillAction.OVERTAKE and d.launch_ids == ("short",)
    assert d.predicted_ttft_s["short"] <= 0.5


def test_no_overtake_if_long_would_miss_its_ttft() -> None:
    model = SynthModel()
    rem = model.prefill_time(PrefillShape(20000), 132)
    long = _flight(0, 20000, rem + 0.005)  # 5 ms of slack < the short one's 20 ms
    d = Dispatcher(model).decide(state(waiting=[req("short", 200, 0.5)], in_flight=long))
    assert d.prefill_action is PrefillAction.CONTINUE


def test_no_overtake_when_not_needed_or_not_shorter() -> None:
    long = _flight(0, 20000, 100.0)
    relaxed = req("short", 200, 50.0)  # can wait: meets its TTFT after the long one
    d = Dispatcher(SynthModel()).decide(state(waiting=[relaxed], in_flight=long))
    assert d.prefill_action is PrefillAction.CONTINUE
    nearly_done = _flight(9, 20000, 100.0)  # 0.2 s left < the 0.5 s of a 5000-token request
    d2 = Dispatcher(SynthModel()).decide(state(waiting=[req("mid", 5000, 0.6)], in_flight=nearly_done))
    assert d2.prefill_action is PrefillAction.CONTINUE
    # A request that misses its TTFT even alone on the whole device does not join the overtaking batch.
    w = [req("short", 200, 0.5), req("doomed", 300, 0.02)]
    d3 = Dispatcher(SynthModel()).decide(state(waiting=w, in_flight=long))
    assert d3.prefill_action is PrefillAction.OVERTAKE and d3.launch_ids == ("short",)


def test_never_overtakes_recursively() -> None:
    running_overtaker = _flight(0, 2000, 100.0)
    paused = _flight(3, 20000, 200.0)
    d = Dispatcher(SynthModel()).decide(
        state(waiting=[req("tiny", 10, 0.05)], in_flight=running_overtaker, paused=paused)
    )
    assert d.prefill_action is PrefillAction.CONTINUE


def test_resume_paused_after_overtaker_finished() -> None:
    paused = _flight(3, 20000, 200.0)
    d = Dispatcher(SynthModel()).decide(state(paused=paused, waiting=[req("x", 10, 0.05)]))
    assert d.prefill_action is PrefillAction.RESUME and d.launch_ids == ()
    assert d.prefill_layers == 7  # no decode: all remaining layers


def test_degrades_decode_first_then_bounded_prefill_turn() -> None:
    cfg = DispatcherConfig(max_prefill_stall_steps=3)
    disp = Dispatcher(SynthModel(), cfg)
    infeasible = state(decode=decodes(64, tpot=0.006), waiting=[req("a", 1000, 10.0)])  # 10 ms even alone
    modes = [disp.decide(infeasible) for _ in range(9)]
    assert [m.mode for m in modes] == ["decode-first"] * 3 + ["prefill-turn"] + ["decode-first"] * 3 + [
        "prefill-turn"
    ] + ["decode-first"]
    for m in modes:
        if m.mode == "decode-first":
            assert m.split == Split(0, 132) and m.prefill_action is PrefillAction.NONE and m.run_decode
        else:
            assert m.split == max(MIXED, key=lambda s: s.decode_sms)
            assert m.prefill_action is PrefillAction.LAUNCH and m.run_decode and not m.tpot_ok
    # Work that fits again resets the stall counter.
    disp.decide(state(decode=decodes(1, tpot=1.0), waiting=[req("a", 1000, 10.0)]))
    assert disp.prefill_stall_steps == 0


def test_no_stall_allowed_means_immediate_prefill_turn() -> None:
    disp = Dispatcher(SynthModel(), DispatcherConfig(max_prefill_stall_steps=0))
    d = disp.decide(state(decode=decodes(64, tpot=0.006), waiting=[req("a", 1000, 10.0)]))
    assert d.mode == "prefill-turn"


def test_device_without_mixed_splits_time_shares() -> None:
    ends = [Split(16, 0), Split(0, 16)]
    disp = Dispatcher(SynthModel(total_sms=16), DispatcherConfig(max_prefill_stall_steps=1))
    s = state(splits=ends, decode=decodes(4, tpot=0.05), waiting=[req("a", 4000, 100.0)])
    first, second = disp.decide(s), disp.decide(s)
    assert first.mode == "decode-first" and first.split == Split(0, 16)
    assert second.mode == "prefill-turn" and second.split == Split(16, 0) and not second.run_decode
    # The prefill turn's block is kept to about one decode budget so decode is not starved.
    assert second.predicted_prefill_block_s <= 0.05 or second.prefill_layers == 1


def test_static_mode_keeps_fixed_split() -> None:
    disp = Dispatcher(SynthModel(), DispatcherConfig(mode="static", static_prefill_share=0.7))
    expect = min(MIXED, key=lambda s: abs(s.prefill_sms / 132 - 0.7))
    for s in (
        state(decode=decodes(4)),
        state(waiting=[req("a", 100, 1.0)]),
        state(decode=decodes(64, 0.001), waiting=[req("a", 100, 1.0)]),
    ):
        d = disp.decide(s)
        assert d.mode == "static" and d.split == expect
    with pytest.raises(ValueError, match="mixed split"):
        disp.decide(state(splits=[Split(8, 0), Split(0, 8)], decode=decodes(1)))


def test_decision_serialises_and_validates_config() -> None:
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(4), waiting=[req("a", 300, 1.0)]))
    data = json.loads(json.dumps(d.to_dict()))
    assert data["prefill_action"] == "launch" and data["split"] == [d.split.prefill_sms, d.split.decode_sms]
    with pytest.raises(ValueError):
        DispatcherConfig(mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DispatcherConfig(max_prefill_tokens=0)
    with pytest.raises(ValueError):
        Dispatcher(SynthModel()).decide(state(splits=[]))
    assert math.isinf(SynthModel().decode_time(1, 10, 0))


def test_decode_load_sums_the_running_requests():
    """The running batch reaches the dispatcher as a `DecodeLoad`: size, KV tokens, tightest step budget."""
    dec = [
        DecodeRequest("a", 900, 0.02, tokens_since_first=10, time_since_first_token_s=0.25),
        DecodeRequest("b", 3000, 0.05),
        DecodeRequest("c", 40, 0.03, tokens_since_first=3, time_since_first_token_s=0.2),
    ]
    load = DecodeLoad.of(dec, DispatcherConfig().max_slack_borrow)
    assert (load.batch, load.kv_tokens) == (3, 3940)
    assert load.step_budget_s == min(r.step_budget(1.0) for r in dec) == pytest.approx(0.01)
    d = Dispatcher(SynthModel()).decide(state(decode=load, waiting=[req("p", 700, 5.0)]))
    assert d.decode_budget_s == load.step_budget_s
    assert d.predicted_decode_step_s == SynthModel().decode_time(3, 3940, d.split.decode_sms, contended=True)
    assert DecodeLoad.of([], 1.0) == DecodeLoad()


def test_priority_goes_before_deadline_order():
    urgent_later = PrefillRequest("p", 500, 0, 0.0, 9.0, 8, priority=-1)
    w = [req("early", 500, 1.0), urgent_later]
    d = Dispatcher(SynthModel(), DispatcherConfig(max_prefill_batch=1)).decide(state(waiting=w))
    assert d.launch_ids == ("p",)
    d = Dispatcher(SynthModel(), DispatcherConfig(max_prefill_batch=1)).decide(
        state(waiting=[req("early", 500, 1.0), req("x", 500, 9.0)])
    )
    assert d.launch_ids == ("early",)


# ---- just enough prefill: when sequence slots are the bottleneck -------------------------------------------


def _prefill_s(tokens: int, sms: int) -> float:
    return SynthModel().prefill_time(PrefillShape(tokens), sms, contended=True)


def test_slot_bound_decode_keeps_the_sms_prefill_does_not_need() -> None:
    """A loose TPOT lets the smallest decode share give prefill 112 SMs; with requests waiting for a slot and
    a prefill that has time to spare, decode keeps the most SMs of any mixed split instead."""
    w = [req("a", 1000, 5.0)]
    free = Dispatcher(SynthModel()).decide(state(decode=decodes(8, tpot=0.1), waiting=w))
    assert free.split == Split(112, 20) and free.mode == "multiplex"
    bound = Dispatcher(SynthModel()).decide(state(decode=decodes(8, tpot=0.1), waiting=w, slot_bound=True))
    assert bound.split == Split(72, 60) and bound.mode == "multiplex" and bound.launch_ids == ("a",)
    assert bound.predicted_decode_step_s < free.predicted_decode_step_s
    assert bound.predicted_ttft_s["a"] == pytest.approx(_prefill_s(1000, 72))
    off = Dispatcher(SynthModel(), DispatcherConfig(prefill_slack_share=0.0))
    assert off.decide(state(decode=decodes(8, tpot=0.1), waiting=w, slot_bound=True)).split == Split(112, 20)


def test_slot_bound_prefill_keeps_what_its_deadline_needs() -> None:
    """Deadline 0.3 s, half of it usable: 1000 tokens need 104 prefill SMs (96 would take too long)."""
    d = Dispatcher(SynthModel()).decide(
        state(decode=decodes(8, tpot=0.1), waiting=[req("a", 1000, 0.3)], slot_bound=True)
    )
    assert d.split == Split(104, 28)
    assert _prefill_s(1000, 104) <= 0.15 < _prefill_s(1000, 96)


def test_slot_bound_counts_the_queue_behind_the_plan() -> None:
    """One request per batch: `a` alone could take 72 SMs, but `b` must still fit within its deadline after
    it (whole-device work 0.1 + 0.2 s, half of b's 1 s of slack), so prefill keeps 88 SMs."""
    cfg = DispatcherConfig(max_prefill_batch=1)
    alone = Dispatcher(SynthModel(), cfg).decide(
        state(decode=decodes(8, tpot=0.1), waiting=[req("a", 1000, 0.6)], slot_bound=True)
    )
    assert alone.split == Split(72, 60)
    queued = Dispatcher(SynthModel(), cfg).decide(
        state(
            decode=decodes(8, tpot=0.1),
            waiting=[req("a", 1000, 0.6), req("b", 2000, 1.0)],
            slot_bound=True,
        )
    )
    assert queued.launch_ids == ("a",) and queued.split == Split(88, 44)
    allowed = 0.5 * 1.0 / 0.3 * 0.1  # b's limit on the slowdown, applied to a's whole-device time
    assert _prefill_s(1000, 88) <= allowed < _prefill_s(1000, 80)


def test_slot_bound_late_prefills_do_not_take_decode_sms() -> None:
    """Every waiting request already missed its TTFT: prefill speed gains nothing, decode gets the most."""
    d = Dispatcher(SynthModel()).decide(
        state(now_s=2.0, decode=decodes(8, tpot=0.1), waiting=[req("a", 1000, 1.0)], slot_bound=True)
    )
    assert d.split == Split(72, 60) and d.launch_ids == ("a",)


def test_slot_bound_respects_the_decode_budget() -> None:
    """Just enough prefill only moves towards more decode SMs; a budget no mixed split meets still degrades
    to decode first."""
    d = Dispatcher(SynthModel()).decide(
        state(decode=decodes(64, tpot=0.004), waiting=[req("a", 1000, 5.0)], slot_bound=True)
    )
    assert d.mode == "decode-first"
    with pytest.raises(ValueError):
        DispatcherConfig(prefill_slack_share=1.5)


# --- folding: short prompts inside the decode step ------------------------------------------------------
# SynthModel costs a mixed step as a prefill of (prompt tokens + one per decode row): 0.1 ms each on 132 SMs.


def test_short_prompt_folds_into_the_decode_step() -> None:
    disp = Dispatcher(SynthModel())
    d = disp.decide(state(decode=decodes(4, tpot=0.03), waiting=[req("a", 100, 1.0)]))
    assert d.mode == "fold" and d.prefill_action is PrefillAction.FOLD and d.launch_ids == ("a",)
    assert d.split == Split(0, 132) and d.run_decode and d.prefill_layers == 0
    step = SynthModel().mixed_step_time([PrefillShape(100)], 4, 4 * 1024, 132)
    assert step == pytest.approx(0.0104)  # 100 prompt tokens + 4 rows
    assert d.predicted_decode_step_s == d.predicted_prefill_remaining_s == pytest.approx(step)
    assert d.predicted_ttft_s == {"a": pytest.approx(step)} and d.tpot_ok
    assert "fold 1 request(s)" in d.reason and json.loads(json.dumps(d.to_dict()))["prefill_action"] == "fold"


def test_fold_takes_the_longest_head_that_keeps_the_decode_budget() -> None:
    # 8 ms per step: no mixed split meets it with contention, the whole device does with 3 ms to spare.
    infeasible = dict(decode=decodes(8, tpot=0.008))
    disp = Dispatcher(SynthModel())
    assert disp.decide(state(**infeasible, waiting=[req("big", 2000, 9.0)])).mode == "decode-first"
    w = [req("a", 30, 1.0), req("b", 30, 2.0), req("c", 30, 3.0)]
    d = disp.decide(state(**infeasible, waiting=w))
    assert d.mode == "fold" and d.launch_ids == ("a", "b")  # (60 + 8) x 0.1 ms; with c 9.8 ms > 8
    assert d.predicted_decode_step_s <= 0.008 and disp.prefill_stall_steps == 0  # prefill made progress
    # The head is never skipped for a later prompt that would fit (prefill order), nor a prompt past free KV.
    blocked = [req("head", 500, 1.0), req("small", 10, 2.0)]
    assert disp.decide(state(**infeasible, waiting=blocked)).mode == "decode-first"
    no_kv = state(**infeasible, waiting=[req("a", 30, 1.0, blocks=50)], free_kv_blocks=40)
    assert disp.decide(no_kv).mode == "decode-only"


def test_fold_only_instead_of_the_whole_planned_launch() -> None:
    # 25 ms budget: two 100-token prompts fold (20.4 ms), three do not; the split plans all three on the
    # prefill lane, so folding two would delay the third: multiplex.
    w = [req(f"r{i}", 100, 1.0 + i) for i in range(3)]
    d = Dispatcher(SynthModel()).decide(state(decode=decodes(4, tpot=0.025), waiting=w))
    assert d.mode == "multiplex" and d.prefill_action is PrefillAction.LAUNCH and len(d.launch_ids) == 3
    two = Dispatcher(SynthModel()).decide(state(decode=decodes(4, tpot=0.025), waiting=w[:2]))
    assert two.mode == "fold" and two.launch_ids == ("r0", "r1")


def test_no_fold_while_a_prefill_runs_or_when_disabled_or_static() -> None:
    busy = state(decode=decodes(4), waiting=[req("a", 100, 1.0)], in_flight=_flight(2, 4000, 5.0))
    d = Dispatcher(SynthModel()).decide(busy)
    assert d.mode == "multiplex" and d.prefill_action is PrefillAction.CONTINUE
    short = state(decode=decodes(4), waiting=[req("a", 100, 1.0)])
    off = Dispatcher(SynthModel(), DispatcherConfig(fold_max_tokens=0)).decide(short)
    assert off.mode == "multiplex" and off.prefill_action is PrefillAction.LAUNCH
    capped = Dispatcher(SynthModel(), DispatcherConfig(fold_max_tokens=99)).decide(short)
    assert capped.mode == "multiplex"
    static = Dispatcher(SynthModel(), DispatcherConfig(mode="static")).decide(short)
    assert static.mode == "static" and static.prefill_action is PrefillAction.LAUNCH
    # Nothing to fold into: with no decode running the prompt gets the whole device on the prefill lane.
    assert Dispatcher(SynthModel()).decide(state(waiting=[req("a", 100, 1.0)])).mode == "prefill-only"
    with pytest.raises(ValueError, match="fold_max_tokens"):
        DispatcherConfig(fold_max_tokens=-1)


# --- tpot margin: decode plans against budget / (1 + margin) ------------------------------------------------


def _with_margin(margin: float) -> Dispatcher:
    return Dispatcher(SynthModel(), DispatcherConfig(tpot_margin=margin))


def test_tpot_margin_gives_decode_more_sms_when_positive_and_fewer_when_negative() -> None:
    # 16 requests at 12 ms: margin 0 needs 44 decode SMs
    # (see test_chooses_smallest_decode_share_meeting_tpot).
    s = state(decode=decodes(16, 0.012), waiting=[req("a", 2000, 10.0)])
    base, safer, bolder = (_with_margin(m).decide(s) for m in (0.0, 0.1, -0.1))
    assert base == Dispatcher(SynthModel()).decide(s)  # margin 0 is the dispatcher without one
    assert base.mode == safer.mode == bolder.mode == "multiplex"
    assert bolder.split.decode_sms < base.split.decode_sms < safer.split.decode_sms
    # Each picks the smallest decode share whose prediction fits the budget divided by (1 + margin).
    for d, margin in ((base, 0.0), (safer, 0.1), (bolder, -0.1)):
        assert d.decode_budget_s == pytest.approx(0.012 / (1 + margin))
        assert d.predicted_decode_step_s <= d.decode_budget_s
    # A margin no mixed split meets degrades to decode first: decode alone.
    assert _with_margin(0.25).decide(s).mode == "decode-first"


def test_tpot_margin_sets_how_much_folds_into_the_decode_step() -> None:
    # 8 ms budget, 30-token prompts: (60 + 8) x 0.1 ms fits at margin 0; one fewer at +0.25, one more at
    # -0.25.
    w = [req("a", 30, 1.0), req("b", 30, 2.0), req("c", 30, 3.0)]
    folded = {
        m: _with_margin(m).decide(state(decode=decodes(8, tpot=0.008), waiting=w)).launch_ids
        for m in (0.0, 0.25, -0.25)
    }
    assert folded == {0.0: ("a", "b"), 0.25: ("a",), -0.25: ("a", "b", "c")}


def test_tpot_margin_must_keep_the_budget_positive() -> None:
    DispatcherConfig(tpot_margin=-0.5)
    with pytest.raises(ValueError, match="tpot_margin"):
        DispatcherConfig(tpot_margin=-1.0)


def test_the_drift_policy_passes_the_configured_margin() -> None:
    partition = PartitionConfig(tpot_margin=0.2)
    assert dispatcher_config("drift", partition).tpot_margin == 0.2
    assert dispatcher_config("drift", PartitionConfig()).tpot_margin == 0.0
    # A fixed split plans nothing against the decode budget.
    assert dispatcher_config("static-split", partition).tpot_margin == 0.0
    assert dispatcher_config("drift", PartitionConfig(mode="static", tpot_margin=0.2)).tpot_margin == 0.0


# --- decisions the simulator may fast-forward -------------------------------------------------------------


def test_repeats_decode_alone_only_when_no_prefill_starts() -> None:
    disp = Dispatcher(SynthModel())
    alone = disp.decide(state(decode=decodes(4)))
    fold = disp.decide(state(decode=decodes(4), waiting=[req("a", 100, 1.0)]))
    split = disp.decide(state(decode=decodes(4), waiting=[req("a", 2000, 10.0)]))
    idle, prefill = disp.decide(state()), disp.decide(state(waiting=[req("a", 100, 1.0)]))
    modes = (alone.mode, fold.mode, split.mode, idle.mode, prefill.mode)
    assert modes == ("decode-only", "fold", "multiplex", "idle", "prefill-only")
    assert disp.repeats_decode_alone(alone) and disp.repeats_decode_alone(fold)
    assert not any(disp.repeats_decode_alone(d) for d in (split, idle, prefill))
    assert alone.split == fold.split == disp.decode_alone_split(SPLITS)
    # Decode first runs decode alone too, but each decision counts towards a prefill turn.
    first = disp.decide(state(decode=decodes(64, tpot=0.006), waiting=[req("a", 1000, 10.0)]))
    assert first.mode == "decode-first" and not disp.repeats_decode_alone(first)
    static = Dispatcher(SynthModel(), DispatcherConfig(mode="static"))
    quiet = static.decide(state(decode=decodes(4)))
    busy = static.decide(state(decode=decodes(4), waiting=[req("a", 100, 1.0)]))
    assert quiet.mode == busy.mode == "static" and quiet.split == static.decode_alone_split(SPLITS)
    assert static.repeats_decode_alone(quiet) and not static.repeats_decode_alone(busy)


@pytest.mark.parametrize("mode", ["slo", "static"])
@pytest.mark.parametrize("stalled", [0, 2])
def test_quiet_decode_split_agrees_with_decide(mode: str, stalled: int) -> None:
    """Where `quiet_decode_split` names a split (the simulator skips that decision), `decide` runs decode
    alone on it, starting no prefill, and leaves the stall count as it was; where it names none, the state
    is not quiet or deciding would reset a stall count."""
    tight = decodes(64, tpot=0.006)  # no mixed split meets it: decode first, then the quiet decision
    states = [
        state(decode=decodes(4)),
        state(decode=tight),
        state(decode=decodes(4), waiting=[req("a", 100, 1.0)]),
        state(decode=decodes(4), waiting=[req("a", 2000, 10.0)]),
        state(decode=tight, in_flight=_flight(3, 4000, 100.0)),
        state(decode=decodes(4), paused=_flight(3, 4000, 100.0)),
    ]
    for s in states:
        disp = Dispatcher(SynthModel(), DispatcherConfig(mode=mode, max_prefill_stall_steps=3))
        for _ in range(stalled):
            disp.decide(state(decode=tight, waiting=[req("b", 1000, 10.0)]))
        before = disp.prefill_stall_steps
        started = s.in_flight is not None or s.paused is not None
        split = disp.quiet_decode_split(s.splits, waiting=bool(s.waiting), started=started)
        d = disp.decide(s)
        if split is not None:
            assert d.run_decode and d.prefill_action is PrefillAction.NONE and d.split == split
            assert disp.repeats_decode_alone(d) and disp.prefill_stall_steps == before == 0
        else:
            assert s.waiting or started or (before > 0 and disp.prefill_stall_steps != before)

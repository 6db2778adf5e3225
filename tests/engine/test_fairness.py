"""Fair scheduling (`fairness: vtc`): the virtual token counter, the waiting queue's order, and a flooding
client against a light one on the pure scheduler; `fairness: none` stays FCFS within a priority."""

from __future__ import annotations

import itertools

import pytest

from drift_agent.core.block_manager import BlockManager
from drift_agent.core.fairness import OUTPUT_WEIGHT, PROMPT_WEIGHT, VirtualTokenCounter
from drift_agent.core.policies import ChunkedPolicy, PrefillFirstPolicy
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.scheduler import Scheduler, SchedulerConfig
from drift_agent.core.sequence import SLO, Sequence
from drift_agent.multiplex.dispatcher import Dispatcher, PrefillRequest
from tests.multiplex.mux_synth import SynthModel

PROMPT, OUT = 8, 8


def make(policy, fairness: str, max_seqs: int = 2, num_blocks: int = 256) -> Scheduler:
    cfg = SchedulerConfig(block_size=4, max_num_seqs=max_seqs, max_num_batched_tokens=64, max_model_len=256)
    cfg.fairness = fairness
    return Scheduler(cfg, BlockManager(num_blocks, 4), policy())


_first = itertools.count(0, PROMPT)


def req(rid: str, client: str, priority: int = 0) -> Sequence:
    first = next(_first)  # distinct prompts: no prefix-cache hits, so each admission computes from 0
    return Sequence(
        rid,
        list(range(first, first + PROMPT)),
        SamplingParams(max_tokens=OUT, ignore_eos=True),
        slo=SLO(priority=priority, client=client),
    )


def step(sched: Scheduler, admitted: list[str]) -> None:
    out = sched.schedule(0.0)
    for b in out.batches:
        for i in b.items:
            if i.start == 0 and i.seq.request_id not in admitted:
                admitted.append(i.seq.request_id)
        sched.on_batch_done(b, {i.seq.seq_id: 1 for i in b.items if i.samples})


def run(sched: Scheduler, max_steps: int = 10_000, check=None) -> list[str]:
    admitted: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return admitted
        step(sched, admitted)
        if check is not None:
            check(sched)
    raise AssertionError("did not finish")


def test_counter_weights_and_lift():
    vtc = VirtualTokenCounter()
    vtc.charge("a", prompt_tokens=10, output_tokens=3)
    assert vtc.counter("a") == 10 * PROMPT_WEIGHT + 3 * OUTPUT_WEIGHT == 16
    assert vtc.served["a"] == 13
    vtc.charge("b", prompt_tokens=4)
    # A client arriving with no work in the system starts at the least-served active client's counter ...
    vtc.lift("new", ["a", "b"])
    assert vtc.counter("new") == 4
    # ... never below its own, and with nobody else active it keeps what it has.
    vtc.charge("a", output_tokens=100)
    vtc.lift("a", ["b"])
    assert vtc.counter("a") == 216
    vtc.lift("c", [])
    assert vtc.counter("c") == 0


@pytest.mark.parametrize("policy", [PrefillFirstPolicy, ChunkedPolicy])
def test_light_client_is_not_starved_by_a_flood(policy):
    def flood(sched: Scheduler) -> None:
        for i in range(30):
            sched.add(req(f"heavy-{i}", "heavy"))
        for i in range(3):
            sched.add(req(f"light-{i}", "light"))

    fair = make(policy, "vtc")
    flood(fair)
    order = run(fair)
    # The light client's requests go in among the first few admissions, not behind the flood.
    assert max(order.index(f"light-{i}") for i in range(3)) < 8, order
    fair.check_invariants()

    fcfs = make(policy, "none")
    flood(fcfs)
    order = run(fcfs)
    assert order[-3:] == ["light-0", "light-1", "light-2"]  # today's FCFS, unchanged


def test_served_tokens_stay_within_a_bound_while_both_clients_wait():
    sched = make(ChunkedPolicy, "vtc", max_seqs=4)
    for i in range(40):
        sched.add(req(f"heavy-{i}", "heavy"))
    for i in range(10):
        sched.add(req(f"light-{i}", "light"))
    vtc = sched.vtc
    assert vtc is not None
    # VTC's bound: while both are backlogged the counters differ by at most about one request's cost per slot.
    bound = 2 * sched.config.max_num_seqs * (PROMPT_WEIGHT * PROMPT + OUTPUT_WEIGHT * OUT)
    worst = [0.0]

    def check(s: Scheduler) -> None:
        clients = {q.slo.client for q in s.waiting}
        if clients == {"heavy", "light"}:
            worst[0] = max(worst[0], abs(vtc.counter("heavy") - vtc.counter("light")))

    run(sched, check=check)
    assert 0 < worst[0] <= bound
    assert vtc.served == {"heavy": 40 * (PROMPT + OUT), "light": 10 * (PROMPT + OUT)}


def test_priority_still_comes_first_and_fcfs_within_a_client():
    sched = make(PrefillFirstPolicy, "vtc", max_seqs=1)
    sched.add(req("a0", "a"))
    sched.add(req("a1", "a"))
    sched.add(req("b0", "b", priority=1))
    sched.add(req("c0", "c", priority=-1))
    order = run(sched)
    assert order.index("c0") == 0 and order.index("b0") == 3
    assert order.index("a0") < order.index("a1")


def test_returning_client_cannot_bank_credit():
    sched = make(ChunkedPolicy, "vtc", max_seqs=1)
    sched.add(req("early", "early"))
    run(sched)  # "early" is served alone, then leaves
    for i in range(10):
        sched.add(req(f"busy-{i}", "busy"))
    admitted: list[str] = []
    for _ in range(30):  # "busy" gets well ahead of "early"'s old counter
        step(sched, admitted)
    vtc = sched.vtc
    assert vtc is not None and vtc.counter("busy") > vtc.counter("early")
    sched.add(req("early-again", "early"))
    # Lifted to the active client's counter: it shares from now on instead of owning the queue for a while.
    assert vtc.counter("early") == vtc.counter("busy")


def test_dispatcher_orders_by_fair_share_then_edf_within_a_client():
    def r(rid: str, deadline: float, share: float) -> PrefillRequest:
        return PrefillRequest(rid, 64, 0, 0.0, deadline, 4, fair_share=share)

    reqs = [r("heavy-late", 9.0, 100.0), r("heavy-soon", 1.0, 100.0), r("light-late", 8.0, 5.0),
            r("light-soon", 2.0, 5.0)]  # fmt: skip
    order = [x.request_id for x in Dispatcher(SynthModel())._prefill_order(reqs, 0.0)]
    assert order == ["light-soon", "light-late", "heavy-soon", "heavy-late"]
    # Without fairness every share is 0: plain EDF, as before.
    plain = [PrefillRequest(x.request_id, 64, 0, 0.0, x.ttft_deadline_s, 4) for x in reqs]
    order = [x.request_id for x in Dispatcher(SynthModel())._prefill_order(plain, 0.0)]
    assert order == ["heavy-soon", "light-soon", "light-late", "heavy-late"]


@pytest.mark.parametrize("policy", ["chunked", "drift"])
def test_simulator_runs_fairness_over_clients(policy):
    from drift_agent.sim.cluster import ClusterConfig
    from drift_agent.sim.runner import SimSetup
    from tests.sim.helpers import mixed_long_and_chat
    from tests.sim.test_sim_core import _assert_same_run

    specs = mixed_long_and_chat(32)
    setup = SimSetup.build(policy=policy, fairness="vtc", cluster=ClusterConfig(clients=4))
    cluster = setup.cluster_for_run()
    run = cluster.run(specs, 6.0, seed=7)
    assert len(run.records) == len(specs)
    vtc = cluster.instances[0].sched.vtc
    assert vtc is not None and len(vtc.served) == 4  # sessions spread over client-0 .. client-3
    assert sum(vtc.served.values()) == sum(s.prompt_len + s.output_len for s in specs)
    # Fast-forwarded decode spans charge their tokens too, and change nothing against stepping.
    _assert_same_run(run, setup.with_instance(fast_forward=False).run(specs, 6.0, seed=7))


@pytest.mark.parametrize("host_blocks", [0, 64])
def test_a_waiting_light_client_preempts_a_heavy_one(host_blocks: int) -> None:
    """Every slot held by long requests of a heavy client: a light client's request would wait for one of them
    to end. With fairness it preempts the most-served client's newest running request (a swap when there is a
    host tier) once that client is the gap ahead; the heavy requests still finish."""

    def light_start(fairness: str) -> tuple[int, Scheduler]:
        cfg = SchedulerConfig(block_size=4, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=512)
        cfg.fairness, cfg.fairness_preempt_gap, cfg.preemption_mode = fairness, 64.0, "swap"
        sched = Scheduler(cfg, BlockManager(256, 4, num_host_blocks=host_blocks), ChunkedPolicy())
        heavy = [
            Sequence(
                f"heavy-{i}",
                list(range(100 * i, 100 * i + 8)),
                SamplingParams(max_tokens=200, ignore_eos=True),
                slo=SLO(client="heavy"),
            )
            for i in range(2)
        ]
        for s in heavy:
            sched.add(s)
        admitted: list[str] = []
        for _ in range(60):  # the heavy client is served well ahead of the gap
            step(sched, admitted)
        sched.add(req("light-0", "light"))
        for n in itertools.count():
            step(sched, admitted)
            if sched.bm.pending.swap_out or sched.bm.pending.swap_in:  # copies land at once here
                copies = sched.bm.take_copies()
                sched.copies_done(copies.ticket)
            sched.check_invariants()
            if "light-0" in admitted:
                break
            assert n < 500
        run(sched, check=lambda s: s.check_invariants())
        assert all(s.num_output_tokens == 200 for s in heavy)
        return n, sched

    fair_n, fair = light_start("vtc")
    fcfs_n, fcfs = light_start("none")
    # The light client arrives lifted to the heavy one's counter (VTC's rule); once the two running heavy
    # requests have been served the gap (2 weighted tokens each per step), one is preempted for it.
    assert fair_n <= 64 / (2 * 2) + 2 < 100 < fcfs_n
    assert fair.num_fairness_preemptions >= 1 and fcfs.num_fairness_preemptions == 0
    assert (fair.num_swap_preemptions >= 1) == bool(host_blocks)

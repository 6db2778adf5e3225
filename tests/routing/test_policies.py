"""The routing policies over `InstanceView`s: the simulator's instances and hand-made views alike."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from drift_agent.multiplex.perf_model import PrefillShape
from drift_agent.routing import (
    ROUTERS,
    InstanceView,
    LeastLoadedRouter,
    PrefixAffinityRouter,
    RandomRouter,
    RoundRobinRouter,
    RouteRequest,
    SLOAwareRouter,
    make_router,
)
from drift_agent.sim import SimSetup


@dataclass
class View:
    """An instance as the HTTP router sees it: figures polled from an agent, a linear cost model."""

    index: int
    pending_prefill_tokens: int = 0
    kv_used_tokens: int = 0
    num_running: int = 0
    kv_usage: float = 0.0
    free_kv_blocks: int = 1000
    block_size: int = 16
    busy_until: float = 0.0
    per_token_s: float = 1e-4
    step_s: float = 0.01
    slo_attainment: float | None = None

    @property
    def load_tokens(self) -> int:
        return self.pending_prefill_tokens + self.kv_used_tokens

    def busy_for(self, now: float) -> float:
        return max(self.busy_until - now, 0.0)

    def queued_prefill_s(self) -> float:
        return self.pending_prefill_tokens * self.per_token_s

    def prefill_s(self, tokens: int) -> float:
        return tokens * self.per_token_s

    def decode_step_s(self, batch: int, kv_tokens: int) -> float:
        return self.step_s


def test_views_satisfy_the_protocol() -> None:
    cluster = SimSetup.build("llama-3-8b", "h100").with_cluster(instances=2).cluster_for_run()
    assert all(isinstance(i, InstanceView) for i in cluster.instances)
    assert isinstance(View(0), InstanceView)


def test_sim_instance_view_figures() -> None:
    cluster = SimSetup.build("llama-3-8b", "h100").with_cluster(instances=1).cluster_for_run()
    inst = cluster.instances[0]
    perf, n = inst.perf, inst.config.max_num_batched_tokens
    inst.pending_prefill_tokens = 5000
    assert inst.queued_prefill_s() == 5000 * (perf.prefill_time(PrefillShape(n), perf.total_sms) / n)
    assert inst.prefill_s(700) == perf.prefill_time(PrefillShape(700), perf.total_sms)
    assert inst.decode_step_s(3, 900) == perf.decode_time(3, 900, perf.total_sms)
    assert inst.busy_for(0.0) == 0.0
    inst.busy, inst.step_end = True, 0.25
    assert inst.busy_for(0.1) == pytest.approx(0.15) and inst.busy_for(1.0) == 0.0
    assert (inst.num_running, inst.block_size) == (0, inst.config.block_size)
    assert inst.free_kv_blocks == inst.config.num_kv_blocks
    assert inst.slo_attainment is None  # no window in the simulator: slo-aware chooses as without it


def test_every_router_refuses_an_empty_list() -> None:
    for name in ROUTERS:
        with pytest.raises(ValueError, match="no instance"):
            make_router(name).route(RouteRequest(10, "k"), [], 0.0)
    with pytest.raises(ValueError, match="unknown router"):
        make_router("hash")
    assert {make_router(n).name for n in ROUTERS} == {
        "round-robin",
        "random",
        "least-loaded",
        "slo-aware",
        "prefix-affinity",
    }


def test_random_is_seeded_and_spreads() -> None:
    views = [View(0), View(1), View(2)]
    picks = [RandomRouter().route(RouteRequest(1), views, 0.0).index for _ in range(1)]
    a, b = RandomRouter(seed=3), RandomRouter(seed=3)
    seq = [a.route(RouteRequest(1), views, 0.0).index for _ in range(60)]
    assert seq == [b.route(RouteRequest(1), views, 0.0).index for _ in range(60)]
    assert set(seq) == {0, 1, 2} and picks[0] in (0, 1, 2)


def test_round_robin_and_least_loaded() -> None:
    views = [View(0, kv_used_tokens=500, kv_usage=0.1), View(1, pending_prefill_tokens=100, kv_usage=0.5)]
    rr = RoundRobinRouter()
    assert [rr.route(RouteRequest(1), views, 0.0).index for _ in range(3)] == [0, 1, 0]
    assert LeastLoadedRouter().route(RouteRequest(1), views, 0.0).index == 1
    assert LeastLoadedRouter("kv").route(RouteRequest(1), views, 0.0).index == 0
    tied = [View(3), View(2)]
    assert LeastLoadedRouter().route(RouteRequest(1), tied, 0.0).index == 2  # ties: the lowest index
    with pytest.raises(ValueError):
        LeastLoadedRouter("queue")


def test_slo_aware_meets_targets_else_earliest_first_token() -> None:
    router = SLOAwareRouter()
    backlog = View(0, pending_prefill_tokens=20_000)  # 2 s of queued prefill
    busy = View(1, busy_until=0.5)
    req = RouteRequest(1000, ttft_s=1.0, tpot_s=0.05)
    assert router.route(req, [backlog, busy], 0.0) is busy
    assert router.predict(req, busy, 0.0) == (pytest.approx(0.6), 0.01, True)
    # The KV does not fit on the idle one: the qualified one goes first even if later.
    full = View(2, free_kv_blocks=10)
    assert router.route(req, [full, busy], 0.0) is busy
    # Nobody meets a 1 ms TPOT: the earliest predicted first token.
    assert router.route(RouteRequest(1000, tpot_s=0.001), [backlog, busy, full], 0.0) is full


def test_prefix_affinity_keys_homes_by_index_and_forgets_departed_ones() -> None:
    router = PrefixAffinityRouter()
    a, b, c = View(7), View(3, kv_used_tokens=10), View(5, kv_used_tokens=20)
    assert router.route(RouteRequest(10, "s1"), [a, b, c], 0.0) is a
    assert router.home == {"s1": 7}
    # Another order of the backends (one joined in front): the key still finds its instance.
    d = View(1, kv_used_tokens=5)
    assert router.route(RouteRequest(10, "s1"), [d, c, b, a], 0.0) is a
    assert router.sticky_hits == 1
    # Its instance is away (refusing, retried elsewhere): served by the least loaded, but it stays the home.
    assert router.route(RouteRequest(10, "s1"), [c, b, d], 10.0) is d
    assert router.home["s1"] == 7 and router.stand_ins == 1 and router.rehomed == 0
    assert router.route(RouteRequest(10, "s1"), [c, b, d, a], 20.0) is a  # back: sticky again
    # Away for longer than rehome_after_s (60 s): the key is new again (least loaded, not a re-home).
    assert router.route(RouteRequest(10, "s1"), [c, b, d], 30.0) is d
    assert router.route(RouteRequest(10, "s1"), [c, b, d], 89.0) is d and router.home["s1"] == 7
    assert router.route(RouteRequest(10, "s1"), [c, b, d], 90.0) is d
    assert router.home["s1"] == 1 and router.rehomed == 0 and router.stand_ins == 3 and not router.away
    # Overloaded past 2x the mean + slack: re-homed.
    d.kv_used_tokens = 100_000
    assert router.route(RouteRequest(10, "s1"), [b, c, d], 100.0) is b
    assert router.rehomed == 1 and router.home["s1"] == 3
    router.forget(3)
    assert "s1" not in router.home
    assert router.route(RouteRequest(10, None), [c, b], 0.0) is b  # no key: least loaded


def test_slo_aware_passes_over_an_instance_failing_its_slo_only_when_attainment_is_known() -> None:
    router = SLOAwareRouter()
    req = RouteRequest(100, ttft_s=1.0)
    idle, busier = View(0), View(1, pending_prefill_tokens=1000)
    assert router.route(req, [idle, busier], 0.0) is idle
    idle.slo_attainment = 0.9  # known and healthy: no change
    assert router.route(req, [idle, busier], 0.0) is idle
    idle.slo_attainment = 0.2  # failing targets its load figures do not explain: passed over
    assert router.route(req, [idle, busier], 0.0) is busier
    busier.slo_attainment = 0.1  # both failing: the predictions decide again
    assert router.route(req, [idle, busier], 0.0) is idle
    # A qualified (predicted to meet the target) failing instance still beats an unqualified healthy one.
    slow = View(2, pending_prefill_tokens=50_000, slo_attainment=1.0)
    assert router.route(req, [idle, slow], 0.0) is idle


def test_prefix_affinity_bounds_its_keys_least_recent_first() -> None:
    router = PrefixAffinityRouter(max_keys=2)
    views = [View(0), View(1)]
    for key in ("a", "b", "a", "c"):
        router.route(RouteRequest(10, key), views, 0.0)
    assert list(router.home) == ["a", "c"]  # "b" was routed least recently
    with pytest.raises(ValueError):
        PrefixAffinityRouter(max_keys=0)

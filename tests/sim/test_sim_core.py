"""The single-instance simulator: determinism, conservation, exact fast-forward, analytic latencies (M/D/1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drift_agent.bench.metrics import GoodputTargets
from drift_agent.bench.workloads import WorkloadParams, generate
from drift_agent.core.policies import ChunkedPolicy, PrefillFirstPolicy
from drift_agent.multiplex.perf_model import PrefillShape
from drift_agent.sim import Cluster, InstanceConfig, LoadSpec, SimSetup, SimulationError, simulate_rate

from .helpers import WHOLE_DEVICE, ConstantModel, mixed_long_and_chat

SLO_ = GoodputTargets(ttft_ms=2000, tpot_ms=50)


def _records(run):
    return [r.to_dict() for r in run.records]


@pytest.mark.parametrize("policy", ["chunked", "drift"])
def test_deterministic_for_a_seed(policy):
    specs = mixed_long_and_chat(24)
    setup = SimSetup.build("llama-3-8b", "h100", policy=policy)
    a = setup.run(specs, 4.0, seed=3, slo=SLO_)
    b = setup.run(specs, 4.0, seed=3, slo=SLO_)
    assert _records(a) == _records(b)
    c = setup.run(specs, 4.0, seed=4, slo=SLO_)
    assert _records(a) != _records(c)  # the seed drives the arrival times


@pytest.mark.parametrize("policy", ["prefill-first", "chunked", "static-split", "drift"])
def test_every_request_finishes_exactly_once_with_its_length(policy):
    specs = mixed_long_and_chat(32)
    # A small pool forces preemptions (recompute), which must not lose or duplicate tokens.
    setup = SimSetup.build("llama-3-8b", "h100", policy=policy, num_kv_blocks=1400)
    cluster = setup.cluster_for_run()
    run = cluster.run(specs, 8.0, slo=SLO_)
    assert cluster.num_finished == len(specs)
    assert [r.request_id for r in run.records] == [s.request_id for s in specs]
    for rec, spec in zip(run.records, specs, strict=True):
        assert rec.success and rec.output_tokens == spec.output_len
        assert len(rec.itl) == spec.output_len - 1
        assert rec.ttft > 0 and rec.latency >= rec.ttft
        assert rec.latency == pytest.approx(rec.ttft + sum(rec.itl), rel=1e-9, abs=1e-9)
    for inst in cluster.instances:
        assert not inst.sched.has_unfinished
        assert inst.bm.num_free_blocks == inst.bm.num_blocks  # every block returned
        inst.bm.check_invariants()
    if policy in ("prefill-first", "chunked"):
        assert run.stats["preemptions"] > 0


@pytest.mark.parametrize("policy", ["prefill-first", "chunked", "static-split", "drift"])
@pytest.mark.parametrize(
    ("blocks", "rate", "seqs"), [(None, 10.0, 256), (700, 30.0, 256), (None, math.inf, 16)]
)
def test_fast_forward_is_exact(policy, blocks, rate, seqs):
    """Fast-forwarded decode spans give the same token times as stepping every step through the policy,
    with and without KV pressure (preemptions) or a full set of sequence slots (a queue that must wait)."""
    specs = generate("sharegpt-like", 80, seed=5)
    base = SimSetup.build("llama-3-8b", "h100", policy=policy, num_kv_blocks=blocks, max_num_seqs=seqs)
    fast = base.run(specs, rate)
    slow = base.with_instance(fast_forward=False).run(specs, rate)
    _assert_same_run(fast, slow)
    if policy in ("prefill-first", "chunked"):  # the multiplexed policies admit whole prompts only
        assert (fast.stats["preemptions"] > 0) == (blocks is not None)


def test_fast_forward_counts_kv_exactly_only_when_the_pool_may_be_short(monkeypatch):
    """Spans skip the per-sequence KV count while the free pool exceeds a bound on their growth; under KV
    pressure the exact count runs, refuses some spans and admits others, and the run still equals stepping
    (a span admitted without room would trip `post_span`'s allocation assert)."""
    from drift_agent.sim.fast_forward import FastForward

    verdicts = []
    fits = FastForward.span_fits_kv

    def recording(self, *args):
        verdicts.append(fits(self, *args))
        return verdicts[-1]

    monkeypatch.setattr(FastForward, "span_fits_kv", recording)
    specs = generate("sharegpt-like", 80, seed=5)
    base = SimSetup.build("llama-3-8b", "h100", policy="chunked", num_kv_blocks=700)
    fast = base.run(specs, 30.0)
    assert True in verdicts and False in verdicts
    slow = base.with_instance(fast_forward=False).run(specs, 30.0)
    _assert_same_run(fast, slow)
    verdicts.clear()
    base.with_instance(num_kv_blocks=100_000).run(specs, 30.0)
    assert not verdicts  # a roomy pool never needs the count


def test_fast_forward_is_exact_with_prefix_caching():
    """Multi-turn sessions over a small pool: cached blocks get evicted while spans run, and every later
    cache hit (hence every prefill length and token time) must be the same as when stepping."""
    specs = generate("multi-turn", 60, seed=3)
    for policy in ("chunked", "drift"):
        base = SimSetup.build(
            "llama-3-8b", "h100", policy=policy, num_kv_blocks=900, enable_prefix_caching=True
        )
        fast = base.run(specs, 3.0)
        slow = base.with_instance(fast_forward=False).run(specs, 3.0)
        _assert_same_run(fast, slow)
        assert 0 < fast.stats["prefix_cache_hit_rate"] == slow.stats["prefix_cache_hit_rate"]


@pytest.mark.parametrize("policy", ["static-split", "drift"])
def test_fast_forward_beside_prefill_blocks_is_exact(policy, monkeypatch):
    """Long prompts land on running decodes: the decode steps beside a prefill job are spanned, and the spans
    run on past the ends of its layer blocks where the lanes' decision there keeps the decode steps as they
    are (and are cut back to the step in flight where it does not); after a job finishes with nothing waiting,
    the decode-alone steps that follow are appended, its sequences joining. Every token time matches stepping."""
    from drift_agent.sim.fast_forward import FastForward

    beside, kept, cut, joined = [], [], [], []
    try_span = FastForward.try_span
    continue_span = FastForward.continue_span
    join_span = FastForward.join_span

    def counting(self, *args, **kw):
        span = try_span(self, *args, **kw)
        if span is not None and kw.get("beside_prefill"):
            beside.append(len(span.durations))
        return span

    def judging(self, launch, horizon, job_finished):
        floor = self.cut
        continue_span(self, launch, horizon, job_finished)
        (kept if len(self.span.durations) > floor else cut).append(floor)

    def joining(self, horizon):
        steps = len(self.span.durations)
        join_span(self, horizon)
        if len(self.span.durations) > steps:
            joined.append(self.span.starts.count(steps))

    monkeypatch.setattr(FastForward, "try_span", counting)
    monkeypatch.setattr(FastForward, "continue_span", judging)
    monkeypatch.setattr(FastForward, "join_span", joining)
    specs = mixed_long_and_chat(40, long_every=3)
    base = SimSetup.build("llama-3-8b", "h100", policy=policy, slo_ttft_ms=4000, slo_tpot_ms=20)
    fast = base.run(specs, 6.0)
    assert beside and max(beside) > 1
    assert kept and cut  # spans ran across block ends, and jobs that finished (or decisions) cut others
    # after a job, the steps of every sequence, the job's joining, extend the span
    assert joined and all(n > 0 for n in joined)
    slow = base.with_instance(fast_forward=False).run(specs, 6.0)
    _assert_same_run(fast, slow)


@pytest.mark.parametrize("policy", ["chunked", "static-split", "drift"])
def test_fast_forward_is_exact_behind_a_load_reading_router(policy):
    """Several instances behind `least-loaded`: the router reads each instance's KV usage and queued prompt
    tokens at every arrival, so spans end before it and those figures (hence every routing choice and token
    time) are the ones stepping gives."""
    specs = mixed_long_and_chat(60, long_every=4, long_len=4096)
    base = SimSetup.build("llama-3-8b", "h100", policy=policy, slo_ttft_ms=4000).with_cluster(
        instances=2, router="least-loaded"
    )
    fast = base.run(specs, 8.0)
    slow = base.with_instance(fast_forward=False).run(specs, 8.0)
    _assert_same_run(fast, slow)


@pytest.mark.parametrize("policy", ["prefill-first", "chunked", "drift"])
def test_fast_forward_from_a_step_that_finishes_prompts_is_exact(policy, monkeypatch):
    """A span may start with a step that runs the last chunk of some prompts beside every decode (for drift, a
    decode step with prompts folded into it): the new sequences' first tokens, and every later token time,
    match stepping."""
    from drift_agent.sim.fast_forward import FastForward

    phases = []
    try_span = FastForward.try_span

    def recording(self, batch, *args, **kw):
        span = try_span(self, batch, *args, **kw)
        if span is not None:
            phases.append(batch.phase)
        return span

    monkeypatch.setattr(FastForward, "try_span", recording)
    specs = generate("sharegpt-like", 80, seed=7)
    base = SimSetup.build("llama-3-8b", "h100", policy=policy)
    fast = base.run(specs, 6.0)
    assert {"prefill", "mixed"} & set(phases)
    if policy == "drift":
        assert "mixed" in phases and fast.stats["instances"][0]["decisions"]["fold"] > 0
    slow = base.with_instance(fast_forward=False).run(specs, 6.0)
    _assert_same_run(fast, slow)


def _assert_same_run(fast, slow) -> None:
    assert fast.stats["fast_forwarded_steps"] > 0  # it did skip work
    assert slow.stats["fast_forwarded_steps"] == 0
    assert fast.stats["steps"] == slow.stats["steps"]
    assert fast.stats["preemptions"] == slow.stats["preemptions"]
    for a, b in zip(fast.records, slow.records, strict=True):
        assert a.output_tokens == b.output_tokens
        assert a.ttft == pytest.approx(b.ttft, abs=1e-9)
        assert a.latency == pytest.approx(b.latency, abs=1e-9)
        np.testing.assert_allclose(np.asarray(a.itl), np.asarray(b.itl), atol=1e-9)


def test_single_request_latencies_are_the_perf_models():
    spec = generate("random", 1, 0, WorkloadParams(input_len=1000, output_len=5))
    setup = SimSetup.build("llama-3-8b", "h100", policy="chunked")
    run = setup.run(spec, 1.0)
    rec = run.records[0]
    perf = setup.perf
    assert rec.ttft == pytest.approx(perf.prefill_time(PrefillShape(1000), perf.total_sms), rel=1e-12)
    # Decode step i attends to the prompt and the i tokens written so far.
    expected = [perf.decode_time(1, 1000 + i + 1, perf.total_sms) for i in range(4)]
    np.testing.assert_allclose(np.asarray(rec.itl), expected, rtol=1e-12)


def test_md1_queue_matches_pollaczek_khinchine():
    """Batch size 1, one constant-time phase, Poisson arrivals: an M/D/1 queue. Mean wait
    rho / (2 mu (1 - rho)); by PASTA a fraction 1 - rho of requests find the server idle and do not wait."""
    s, rho, n = 0.1, 0.5, 8000
    specs = generate("random", n, 0, WorkloadParams(input_len=32, output_len=1))
    cluster = Cluster(ConstantModel(s), WHOLE_DEVICE, InstanceConfig(max_num_seqs=1, num_kv_blocks=64))
    run = cluster.run(specs, rho / s, seed=0)
    ttft = np.array([r.ttft for r in run.records])
    wait = ttft - s
    assert wait.min() >= -1e-12
    assert wait.mean() == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.08)
    assert np.mean(wait < 1e-9) == pytest.approx(1 - rho, abs=0.03)
    assert len(run.records) / run.duration_s == pytest.approx(rho / s, rel=0.03)


def test_policy_objects_are_the_engines():
    setup = SimSetup.build("llama-3-8b", "h100")
    assert isinstance(setup.with_policy("chunked").cluster_for_run().instances[0].policy, ChunkedPolicy)
    assert isinstance(
        setup.with_policy("prefill-first").cluster_for_run().instances[0].policy, PrefillFirstPolicy
    )
    from drift_agent.multiplex.policies import MultiplexPolicy

    mux = setup.with_policy("drift").cluster_for_run().instances[0]
    assert isinstance(mux.policy, MultiplexPolicy) and mux.multiplexing


def test_prompt_that_never_fits_fails_that_request_only():
    specs = generate("random", 3, 0, WorkloadParams(input_len=100, output_len=4))
    big = generate("random", 1, 1, WorkloadParams(input_len=5000, output_len=4), id_prefix="big")
    setup = SimSetup.build("llama-3-8b", "h100", num_kv_blocks=64)  # 1024 tokens of KV
    run = setup.run([*specs, *big], 2.0)
    assert [r.success for r in run.records] == [True, True, True, False]
    assert "prompt has 5000 tokens" in run.records[-1].error


def test_summary_uses_bench_metrics():
    specs = generate("random", 50, 0, WorkloadParams(input_len=512, output_len=64))
    point = simulate_rate(SimSetup.build("llama-3-8b", "h100"), specs, 5.0, LoadSpec(slo=SLO_))
    s = point.summary
    assert s["completed"] == 50 and s["slo_attainment"] == 1.0
    assert s["request_goodput"] == pytest.approx(50 / s["duration_s"])
    assert s["mean_tpot_ms"] > 0 and s["p99_itl_ms"] >= s["median_itl_ms"]


def test_empty_workload_is_refused():
    with pytest.raises(ValueError):
        SimSetup.build("llama-3-8b", "h100").run([], 1.0)
    assert issubclass(SimulationError, RuntimeError)


def test_max_concurrency_caps_requests_in_flight():
    from drift_agent.bench.metrics import peak_output_and_concurrency

    specs = generate("random", 30, 0, WorkloadParams(input_len=256, output_len=16))
    run = SimSetup.build("llama-3-8b", "h100").run(specs, float("inf"), max_concurrency=4)
    _, peak = peak_output_and_concurrency(run.records)
    assert peak == 4 and all(r.success for r in run.records)
    assert max(r.start_time for r in run.records) > 0  # later requests waited for a slot


def test_a_cluster_runs_once():
    specs = generate("random", 2, 0, WorkloadParams(input_len=64, output_len=2))
    cluster = SimSetup.build("llama-3-8b", "h100").cluster_for_run()
    cluster.run(specs, 1.0)
    with pytest.raises(RuntimeError, match="one run"):
        cluster.run(specs, 1.0)


@pytest.mark.parametrize(
    ("workload", "caching", "instances"),
    [
        ("multi-turn", True, 1),
        ("multi-turn", False, 1),
        ("sharegpt-like", False, 1),
        ("sharegpt-like", False, 2),
    ],
)
def test_prompt_ids_are_unique_only_where_read_and_cheap_ids_change_nothing(
    monkeypatch, workload, caching, instances
):
    import drift_agent.sim.cluster as cluster_module
    from drift_agent.sim.requests import TokenSource

    asked: list[bool] = []

    class AlwaysUnique(TokenSource):
        def __init__(self, prefix_len: int = 0, unique: bool = True) -> None:
            asked.append(unique)
            super().__init__(prefix_len, unique=True)

    specs = generate(workload, 150, seed=2)
    setup = SimSetup.build("llama-3-8b", "h100", policy="drift", enable_prefix_caching=caching)
    if instances > 1:
        setup = setup.with_cluster(instances=instances, router="prefix-affinity")
    plain = setup.run(specs, 6.0)
    monkeypatch.setattr(cluster_module, "TokenSource", AlwaysUnique)
    unique = setup.run(specs, 6.0)
    # A prefix cache reads the ids, and so does a router keyed on a prompt's first block (several instances).
    assert asked == [caching or instances > 1]
    assert _records(plain) == _records(unique)

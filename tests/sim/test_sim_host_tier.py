"""The host KV tier in the simulator: host prefix hits after device eviction, swap preemption, the time copies
take on the virtual clock, block groups, fast-forward exactness, invariants and fair scheduling with
preemption."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drift_agent.bench.metrics import RequestRecord
from drift_agent.bench.workloads import RequestSpec, WorkloadParams, generate
from drift_agent.multiplex.devices import PCIE4_X16, PCIE5_X16, lookup_device
from drift_agent.sim import SimSetup
from drift_agent.sim.cluster import Cluster, ClusterConfig, SimulationError
from drift_agent.sim.host_tier import COPY_RUN_LATENCY_S, HOST_COPY_EFFICIENCY
from drift_agent.sim.instance import InstanceConfig, SimInstance


def _multi_turn() -> list[RequestSpec]:
    return generate("multi-turn", 150, 3, WorkloadParams(output_len=256, mean_turns=4.0, think_time_s=3.0))


def _setup(**kw) -> SimSetup:
    args = {"policy": "chunked", "num_kv_blocks": 500, "enable_prefix_caching": True} | kw
    return SimSetup.build("llama-3-8b", "h100", **args)


def _run_checked(setup: SimSetup, specs: list[RequestSpec], rate: float, every: int = 16, **kw):
    """Run, checking the scheduler's invariants (queues, refcounts of both tiers, copies' holds) every
    `every`-th step boundary and at the end, where every block and copy must be back."""
    cluster = setup.cluster_for_run()
    for inst in cluster.instances:
        complete = inst.complete_step

        def checked(now: float, inst: SimInstance = inst, complete=complete):
            if inst.num_steps % every == 0:
                inst.sched.check_invariants()
            return complete(now)

        inst.complete_step = checked  # type: ignore[method-assign]
    run = cluster.run(specs, rate, **kw)
    for inst in cluster.instances:
        inst.sched.check_invariants()
        assert not inst.sched.has_unfinished
        assert inst.bm.copies_outstanding == 0 and inst.bm.pending.is_empty
        assert inst.bm.num_free_blocks == inst.bm.num_blocks
        assert inst.bm.num_free_host_blocks == inst.bm.num_host_blocks
    return run


def _tokens_by(rec: RequestRecord, t: float) -> float:
    """VTC-weighted tokens (prompt 1, output 2) `rec` was served by time `t`."""
    first = rec.start_time + rec.ttft
    if first > t:
        return 0.0
    times = first + np.concatenate(([0.0], np.cumsum(rec.itl)))
    return rec.prompt_tokens + 2.0 * int(np.searchsorted(times, t, side="right"))


def test_devices_know_their_host_link():
    assert lookup_device("NVIDIA H100 80GB HBM3").host_bw == PCIE5_X16 == 64e9
    assert lookup_device("NVIDIA H200").host_bw == PCIE5_X16
    assert lookup_device("NVIDIA A100-SXM4-80GB").host_bw == PCIE4_X16 == 32e9
    assert lookup_device("NVIDIA L4").host_bw == PCIE4_X16
    setup = SimSetup.build("llama-3-8b", "a100-80gb", swap_space_gb=1)
    assert setup.instance.host_bw == PCIE4_X16


def test_defaults_have_no_host_tier_and_report_recompute():
    run = _setup().run(_multi_turn(), 8.0, seed=1)
    assert "host_tier" not in run.stats
    assert run.stats["swap_preemptions"] == 0
    assert run.stats["recomputed_tokens"] >= 0
    assert run.stats["history_tokens"] > run.stats["history_reprefill_tokens"] > 0


def test_host_tier_serves_multi_turn_prefixes_the_device_evicted():
    """A pool too small to keep the conversations: later turns find their history in the host tier and copy
    it back instead of prefilling it again."""
    specs = _multi_turn()
    without = _setup().run(specs, 8.0, seed=1)
    with_tier = _run_checked(_setup(swap_space_gb=4), specs, 8.0, seed=1)
    tier = with_tier.stats["host_tier"]
    assert tier["prefix_host_hit_tokens"] > 0
    assert tier["demoted_blocks"] > 0 and tier["promoted_blocks"] > 0
    assert tier["copies_in"]["copy_s"] > 0 and tier["blocking_copy_wait_s"] > 0
    # Most of what was prefilled again without the tier is copied instead.
    again = with_tier.stats["history_reprefill_tokens"]
    assert again < 0.5 * without.stats["history_reprefill_tokens"]
    assert with_tier.stats["prefix_cache_hit_rate"] > without.stats["prefix_cache_hit_rate"]
    # Without the tier's prefix cache (a swap-only tier) nothing is hit there.
    swap_only = _setup(swap_space_gb=4, host_prefix_cache=False).run(specs, 8.0, seed=1)
    assert swap_only.stats["host_tier"]["prefix_host_hit_tokens"] == 0
    assert swap_only.stats["host_tier"]["demoted_blocks"] == 0


def _preempting() -> tuple[list[RequestSpec], float]:
    """Long answers on a small pool: running sequences outgrow it and are preempted."""
    specs = generate("random", 48, 2, WorkloadParams(input_len=1024, output_len=768, range_ratio=0.5))
    return specs, 20.0


@pytest.mark.parametrize("policy", ["chunked", "prefill-first", "drift"])
def test_swap_preemption_recomputes_nothing(policy):
    specs, rate = _preempting()
    recompute = _setup(policy=policy, enable_prefix_caching=False).run(specs, rate)
    assert recompute.stats["preemptions"] > 0 and recompute.stats["recomputed_tokens"] > 0
    swap = _run_checked(
        _setup(policy=policy, enable_prefix_caching=False, swap_space_gb=4, preemption_mode="swap"),
        specs,
        rate,
    )
    stats = swap.stats
    assert stats["preemptions"] == stats["swap_preemptions"] > 0
    assert stats["recomputed_tokens"] == 0
    tier = stats["host_tier"]
    assert tier["swapped_out_blocks"] > 0 and tier["swapped_in_blocks"] > 0
    assert tier["copies_out"]["blocks"] == tier["swapped_out_blocks"]  # no prefix cache: nothing demoted
    assert all(r.success for r in swap.records)


def test_auto_preemption_swaps_when_the_model_says_copying_is_cheaper():
    """On an H100 a block crosses PCIe (2 MiB at 80% of 64 GB/s: ~41 us) far faster than its 16 tokens are
    prefilled again, so `auto` swaps every victim."""
    specs, rate = _preempting()
    setup = _setup(enable_prefix_caching=False, swap_space_gb=4)
    assert setup.instance.preemption_mode == "auto"
    cluster = setup.cluster_for_run()
    costs = cluster.instances[0].sched.swap_costs
    block_bytes = setup.kv_bytes_per_token * setup.instance.block_size
    assert costs.copy_s_per_block == pytest.approx(block_bytes / (64e9 * HOST_COPY_EFFICIENCY))
    assert 0 < 2 * costs.copy_s_per_block < 16 * costs.recompute_s_per_token
    run = cluster.run(specs, rate)
    assert run.stats["preemptions"] == run.stats["swap_preemptions"] > 0


def _two_turns_evicted() -> list[RequestSpec]:
    """Session a's first turn (2000 tokens), then session b's prompt, which needs most of the pool and evicts
    a's cached blocks; a's second turn comes back for them."""
    return [
        RequestSpec("a0", "", 2000, 16, "a", 0, 2000),
        RequestSpec("a1", "", 2000 + 16 + 16, 16, "a", 1, 16, think_time_s=5.0),
        RequestSpec("b0", "", 2900, 16, "b", 0, 2900),
    ]


def test_promoted_prefix_hits_cost_their_copy_time_in_ttft():
    """The step that admits a request with host hits waits for their copy: a slower host link adds exactly
    the longer copy to its TTFT, and either beats prefilling the history again."""
    specs = _two_turns_evicted()
    ttft: dict[float, float] = {}
    waits: dict[float, float] = {}
    for bw in (64e9, 8e9):
        # (Recompute: with `auto` the link's speed would also decide how b's first chunk is preempted.)
        setup = _setup(num_kv_blocks=200, swap_space_gb=1, host_bw=bw, preemption_mode="recompute")
        run = _run_checked(setup, specs, math.inf, every=1)
        tier = run.stats["host_tier"]
        assert tier["prefix_host_hit_tokens"] >= 1600  # most of a's history came from the host
        ttft[bw] = next(r.ttft for r in run.records if r.request_id == "a1")
        waits[bw] = tier["blocking_copy_wait_s"]
        # The wait is the copy: its runs' latency plus its bytes at the link's effective rate.
        block_bytes = setup.kv_bytes_per_token * setup.instance.block_size
        copy = tier["copies_in"]
        expected = copy["runs"] * COPY_RUN_LATENCY_S + copy["blocks"] * block_bytes / (
            bw * HOST_COPY_EFFICIENCY
        )
        assert copy["copy_s"] == pytest.approx(expected)
    assert ttft[8e9] > ttft[64e9]
    assert ttft[8e9] - ttft[64e9] == pytest.approx(waits[8e9] - waits[64e9], abs=1e-9)
    recompute = _setup(num_kv_blocks=200).run(specs, math.inf)
    assert next(r.ttft for r in recompute.records if r.request_id == "a1") > ttft[8e9]


def test_block_groups_coalesce_copies_into_runs():
    """Prompts allocated at once from a fresh pool take consecutive blocks, so swapping a victim out and back
    moves its prompt in a few large copies, not one per block (decode growth takes one block at a time,
    interleaved with the other sequences', so long prompts and short answers show it best)."""
    specs = generate("random", 48, 2, WorkloadParams(input_len=2048, output_len=256, range_ratio=0.5))
    run = _setup(enable_prefix_caching=False, swap_space_gb=4, preemption_mode="swap").run(specs, 20.0)
    tier = run.stats["host_tier"]
    assert tier["swapped_out_blocks"] > 0
    assert tier["mean_copy_run_blocks"] > 4
    runs = tier["copies_out"]["runs"] + tier["copies_in"]["runs"]
    assert runs < (tier["copies_out"]["blocks"] + tier["copies_in"]["blocks"]) / 4


@pytest.mark.parametrize("policy", ["chunked", "prefill-first", "static-split", "drift"])
@pytest.mark.parametrize(("fairness", "mode"), [("none", "swap"), ("vtc", "swap"), ("vtc", "recompute")])
def test_fast_forward_is_exact_with_a_host_tier(policy, fairness, mode):
    """Spans stop where copies or swapped sequences are about (and at finishes, which start copies), take the
    blocks stepping would take (copies coalesce by block id), and with fair scheduling hold the tokens served
    by each arrival: every token time, step count and copy equals stepping."""
    specs = _multi_turn()
    base = _setup(
        policy=policy,
        swap_space_gb=2,
        preemption_mode=mode,
        fairness=fairness,
        cluster=ClusterConfig(clients=4),
    )
    fast = base.run(specs, 8.0, seed=1)
    slow = base.with_instance(fast_forward=False).run(specs, 8.0, seed=1)
    assert fast.stats["fast_forwarded_steps"] > 0 and slow.stats["fast_forwarded_steps"] == 0
    for key in ("steps", "preemptions", "swap_preemptions", "fairness_preemptions", "host_tier"):
        assert fast.stats[key] == slow.stats[key], key
    for a, b in zip(fast.records, slow.records, strict=True):
        assert a.output_tokens == b.output_tokens
        assert a.ttft == pytest.approx(b.ttft, abs=1e-9)
        assert a.latency == pytest.approx(b.latency, abs=1e-9)
        np.testing.assert_allclose(np.asarray(a.itl), np.asarray(b.itl), atol=1e-9)


def test_same_seed_same_run():
    specs = _multi_turn()
    setup = _setup(swap_space_gb=2, preemption_mode="swap", fairness="vtc", cluster=ClusterConfig(clients=4))
    a = setup.run(specs, 8.0, seed=5)
    b = setup.run(specs, 8.0, seed=5)
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    assert a.stats == b.stats
    c = setup.run(specs, 8.0, seed=6)
    assert [r.to_dict() for r in a.records] != [r.to_dict() for r in c.records]


@pytest.mark.parametrize("policy", ["chunked", "static-split"])
def test_invariants_hold_throughout_swapping_and_fairness(policy):
    specs = _multi_turn()
    setup = _setup(
        policy=policy,
        swap_space_gb=2,
        preemption_mode="swap",
        fairness="vtc",
        cluster=ClusterConfig(clients=4),
    )
    run = _run_checked(setup, specs, 8.0, every=3, seed=1)
    assert run.stats["swap_preemptions"] > 0
    assert sum(run.stats["served_tokens_per_client"].values()) > 0


def _flood_and_light() -> tuple[list[RequestSpec], tuple[tuple[str, str], ...]]:
    """A client that floods the queue with long requests ahead of a light client's few, alike in shape."""
    specs, owners = [], []
    for i in range(32):
        specs.append(RequestSpec(f"f{i}", "", 512, 1024, f"f{i}", 0, 512))
        owners.append((f"f{i}", "flood"))
    for i in range(8):
        specs.append(RequestSpec(f"l{i}", "", 512, 1024, f"l{i}", 0, 512))
        owners.append((f"l{i}", "light"))
    return specs, tuple(owners)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_flooding_client_cannot_starve_a_light_one(mode):
    """FCFS serves the light client after the whole flood; VTC with preemption gives it about half of the
    service while both are backlogged (the flood's running requests are preempted for it)."""
    specs, owners = _flood_and_light()
    cluster = ClusterConfig(session_clients=owners)
    runs = {}
    for fairness in ("none", "vtc"):
        setup = _setup(
            max_num_seqs=4,
            swap_space_gb=2,
            preemption_mode=mode,
            fairness=fairness,
            fairness_preempt_gap=2048,
            cluster=cluster,
        )
        runs[fairness] = _run_checked(setup, specs, 200.0, every=5)
    fair = runs["vtc"]
    assert fair.stats["fairness_preemptions"] > 0
    if mode == "swap":
        assert fair.stats["recomputed_tokens"] == 0
    # While both are backlogged: up to the light client's last completion under VTC.
    light_done = max(r.start_time + r.latency for r in fair.records if r.request_id.startswith("l"))

    def served(run, prefix: str) -> float:
        return sum(_tokens_by(r, light_done) for r in run.records if r.request_id.startswith(prefix))

    ratio = served(fair, "l") / served(fair, "f")
    assert 0.5 < ratio < 2.0
    assert served(runs["none"], "l") < 0.1 * served(runs["none"], "f")
    assert fair.stats["served_tokens_per_client"]["light"] == 8 * (512 + 1024)


def test_a_scheduler_that_only_moves_kv_is_stopped(monkeypatch):
    """A scheduler that swaps every sequence out as soon as it is back never runs a batch: the simulator stops
    it with an error instead of spinning on copies forever."""
    from drift_agent.core.policies import ChunkedPolicy
    from drift_agent.core.scheduler import SchedulerOutput

    schedule = ChunkedPolicy.schedule

    def churn(self, sched, now):
        idle = [s for s in sched.running if not s.in_flight]
        if not idle:
            return schedule(self, sched, now)
        for seq in idle:
            sched.preempt(seq)
        return SchedulerOutput()

    monkeypatch.setattr(ChunkedPolicy, "schedule", churn)
    specs, rate = _preempting()
    setup = _setup(enable_prefix_caching=False, swap_space_gb=4, preemption_mode="swap")
    with pytest.raises(SimulationError, match="livelock"):
        setup.run(specs[:4], rate)


def test_fairness_preemption_with_swap_makes_progress():
    # A fairness victim once came back ahead of the request it was preempted for, and was preempted again,
    # forever (SimulationError after 1000 steps of copies only).
    setup = _setup(
        policy="static-split",
        swap_space_gb=2,
        preemption_mode="swap",
        fairness="vtc",
        fairness_preempt_gap=500,
        cluster=ClusterConfig(clients=4),
    )
    setup.run(_multi_turn(), 8.0, seed=1)


def test_instance_config_checks_the_tier_options():
    with pytest.raises(ValueError, match="preemption mode"):
        InstanceConfig(preemption_mode="drop")
    with pytest.raises(ValueError, match="swap_space_gb"):
        InstanceConfig(swap_space_gb=-1)
    setup = _setup(swap_space_gb=1)
    with pytest.raises(ValueError, match="KV bytes per token"):
        Cluster(setup.perf, list(setup.splits), setup.instance, kv_bytes_per_token=0)
    # 1 GiB of 2 MiB blocks (Llama-3-8B: 128 KiB of KV per token, 16 tokens a block).
    assert setup.cluster_for_run().instances[0].bm.num_host_blocks == 512


def test_cli_runs_the_host_tier_and_saves_its_figures(tmp_path, capsys):
    from drift_agent.bench.results import load_result
    from drift_agent.cli import main

    out = tmp_path / "tier.json"
    argv = ["sim", "run", "--workload", "multi-turn", "--num-prompts", "150", "--output-len", "256"]
    argv += ["--think-time", "3", "--request-rate", "8", "--num-kv-blocks", "500", "--swap-space-gb", "2"]
    argv += ["--preemption-mode", "swap", "--host-bandwidth", "32", "--fairness", "vtc", "--clients", "4"]
    argv += ["--seed", "3", "--save-result", str(out)]
    assert main(argv) == 0
    assert "host tier:" in capsys.readouterr().err
    doc = load_result(out)
    instance = doc["config"]["instance"]
    assert instance["swap_space_gb"] == 2 and instance["preemption_mode"] == "swap"
    assert instance["host_bw"] == 32e9 and instance["host_prefix_cache"] is True
    stats = doc["runs"][0]["sim_stats"]
    assert stats["host_tier"]["prefix_host_hit_tokens"] > 0
    assert stats["recomputed_tokens"] == 0
    assert len(stats["served_tokens_per_client"]) == 4
    assert "host_tier" in stats["instances"][0]
    with pytest.raises(SystemExit):
        main(["sim", "run", "--preemption-mode", "drop"])

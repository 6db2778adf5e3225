"""The multiplexed engine (shared partitioner on CPU): prefill layer blocks and decode steps run as separate
concurrent batches over one KV pool, and must never change results."""

from __future__ import annotations

import json
import random

import pytest

from drift_agent.core.config import EngineConfig
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.llm_engine import LLMEngine
from tests.tiny_models import tiny_model_dir

GREEDY = dict(temperature=0.0, ignore_eos=True)


def engine(policy: str, **kw) -> LLMEngine:
    base = dict(model=str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=256, policy=policy)
    return LLMEngine(EngineConfig(**(base | kw)))


def workload(seed: int, n: int):
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(16)]
    prompts = [
        (shared if i % 3 == 0 else []) + [rng.randrange(3, 500) for _ in range(rng.randint(2, 70))]
        for i in range(n)
    ]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), **GREEDY) for _ in prompts]
    return prompts, params


@pytest.fixture(scope="module")
def reference():
    ref = engine("chunked")
    return lambda prompts, params: [o.token_ids for o in ref.generate(prompts, params)]


@pytest.mark.parametrize("policy", ["drift", "static-split"])
def test_multiplexed_equals_sequential(policy, reference):
    prompts, params = workload(1, 10)
    eng = engine(policy)
    assert eng.is_multiplexing
    assert [o.token_ids for o in eng.generate(prompts, params)] == reference(prompts, params)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("fold", [2048, 0])
def test_multiplexed_with_preemption_and_arrivals_mid_run(reference, fold):
    """Arrivals beside running decodes: folded into the decode step (the dispatcher's folding), or as prefill
    jobs on their own lane when folding is off. Either way the tokens are the sequential engine's."""
    prompts, params = workload(2, 8)
    eng = engine("drift", num_kv_blocks=40, partition={"fold_max_tokens": fold})
    for i in range(4):
        eng.add_request(f"r{i}", prompts[i], params[i])
    done: dict[str, list[int]] = {}
    for step in range(2000):
        if step == 5:
            for i in range(4, 8):
                eng.add_request(f"r{i}", prompts[i], params[i])
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if len(done) == 8:
            break
    assert [done[f"r{i}"] for i in range(8)] == reference(prompts, params)
    assert eng.block_manager.num_free_blocks == 40
    assert bool(eng.stats().decisions.get("fold")) == bool(fold)


def test_prefill_is_launched_in_layer_blocks_beside_decodes(tmp_path):
    """With decodes running and a tight TPOT target, prefill advances a few layers per block beside the decode
    steps, and the trace shows the decisions and each lane's predicted and actual latencies."""
    trace = tmp_path / "trace.jsonl"
    eng = engine("drift", trace_path=str(trace), slo_tpot_ms=0.05, slo_ttft_ms=60_000)
    rng = random.Random(3)
    for i in range(4):
        eng.add_request(
            f"d{i}", [rng.randrange(3, 500) for _ in range(8)], SamplingParams(max_tokens=40, **GREEDY)
        )
    for _ in range(3):
        eng.step()
    eng.add_request(
        "long", [rng.randrange(3, 500) for _ in range(200)], SamplingParams(max_tokens=2, **GREEDY)
    )
    while eng.has_unfinished_requests():
        eng.step()
    eng.trace.close()
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    decisions = [r for r in rows if "lane" not in r]
    lanes = [r for r in rows if "lane" in r]
    assert decisions and all("split" in r and "mode" in r for r in decisions)
    blocks = [r["prefill_layers"] for r in decisions if r["prefill_layers"] and r["run_decode"]]
    assert blocks and min(blocks) < eng.runner.model.num_layers  # partial launches happened beside decodes
    assert any(r["predicted_decode_step_s"] is not None for r in decisions)
    # Every completed launch on either lane is traced with its predicted and measured latency.
    assert {r["lane"] for r in lanes} == {"decode", "prefill"}
    assert all(r["actual_s"] > 0 and r["predicted_s"] > 0 for r in lanes)


def test_policy_switch_at_run_time_keeps_every_request(reference):
    prompts, params = workload(4, 6)
    eng = engine("drift")
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    done: dict[str, list[int]] = {}
    policies = ["chunked", "static-split", "prefill-first", "drift"]
    for step in range(2000):
        if step % 3 == 1 and policies:
            eng.update_settings(policy=policies.pop(0))
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if not eng.has_unfinished_requests():
            break
    assert [done[f"r{i}"] for i in range(6)] == reference(prompts, params)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_bad_settings_change_nothing():
    eng = engine("chunked")
    with pytest.raises(ValueError):
        eng.update_settings(policy="fastest")
    with pytest.raises(ValueError):
        eng.update_settings(partition={"prefill_sm_share": 2.0})
    assert eng.config.policy == "chunked" and eng.scheduler.policy.name == "chunked"

"""The real engine with a host KV tier: requests swapped out and back in at random steps, and prefix hits served
from the host tier, give exactly the outputs of an undisturbed run (greedy and seeded sampling)."""

from __future__ import annotations

import functools
import random

import pytest

from drift_agent.core.config import EngineConfig
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.llm_engine import LLMEngine
from tests.tiny_models import tiny_model_dir

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True),
]


def engine(**kw) -> LLMEngine:
    base = dict(
        model=str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=128, max_num_batched_tokens=64
    )
    return LLMEngine(EngineConfig(**(base | kw)))


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(rng.randint(6, 30))] for _ in range(count)]


def run(eng: LLMEngine, ps: list[list[int]], disturb: random.Random | None = None) -> dict[str, list[int]]:
    """Every prompt with each of PARAMS; `disturb`: between steps, preempt a random running request."""
    for i, p in enumerate(ps):
        for j, params in enumerate(PARAMS):
            eng.add_request(f"r{i}-{j}", p, params)
    done: dict[str, list[int]] = {}
    sched = eng.scheduler
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        if disturb is not None and sched.running and disturb.random() < 0.5:
            sched.preempt(disturb.choice(sched.running))
        for out in eng.step():
            if out.finished:
                assert out.finish_reason == "length", out.error
                done[out.request_id] = out.token_ids
        eng.check_invariants()
    assert not eng.has_unfinished_requests()
    return done


@functools.cache
def reference(seed: int, count: int) -> dict[str, list[int]]:
    """The undisturbed outputs, computed once per prompt set."""
    return run(engine(), prompts(seed, count))


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
@pytest.mark.parametrize("policy", ["chunked", "drift"])
def test_outputs_survive_random_preemptions(mode: str, policy: str) -> None:
    ps = prompts(1, 4)
    eng = engine(policy=policy, swap_space_gb=0.01, preemption_mode=mode)
    if mode == "auto":  # long requests swap, short ones recompute
        eng.scheduler.swap_costs.copy_s_per_block, eng.scheduler.swap_costs.recompute_s_per_token = 1.0, 0.6
        eng.copier.stats.rate_gbps = lambda direction: None  # keep those costs, whatever the copies measure
    assert run(eng, ps, random.Random(3)) == reference(1, 4)
    sched, bm = eng.scheduler, eng.block_manager
    assert sched.num_preemptions > 5
    if mode == "swap":
        assert sched.num_swap_preemptions == sched.num_preemptions and sched.num_recomputed_tokens == 0
        assert bm.swapped_in_blocks + bm.reused_blocks > 0
    elif mode == "recompute":
        assert sched.num_swap_preemptions == 0
    else:
        assert 0 < sched.num_swap_preemptions < sched.num_preemptions
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks
    stats = eng.stats()
    assert stats.kv_copy_bytes["out"] > 0 and stats.kv_copies["out"] <= stats.kv_copy_bytes["out"]


def test_a_tiny_pool_swaps_instead_of_recomputing() -> None:
    ps = prompts(2, 3)
    eng = engine(num_kv_blocks=20, swap_space_gb=0.01, preemption_mode="swap")
    assert run(eng, ps) == reference(2, 3)
    assert eng.scheduler.num_swap_preemptions > 0 and eng.scheduler.num_recomputed_tokens == 0


def test_multi_turn_prefix_comes_back_from_the_host_tier() -> None:
    eng = engine(num_kv_blocks=24, swap_space_gb=0.01)
    ref = engine()
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    turn1 = prompts(4, 1)[0] + prompts(5, 1)[0]
    answer = eng.generate([turn1], greedy)[0].token_ids
    assert answer == ref.generate([turn1], greedy)[0].token_ids
    # Other traffic fills the device pool: turn 1's blocks are evicted there, but were saved to the host tier.
    eng.generate([list(range(100, 188))], SamplingParams(max_tokens=8, ignore_eos=True))
    turn2 = turn1 + answer + [7, 8, 9]
    assert eng.block_manager.find_cached_prefix(eng.make_sequence("probe", turn2)) == []
    out = eng.generate([turn2], greedy)[0]
    cached = (len(turn1) + len(answer) - 1) // 4 * 4
    assert out.num_cached_tokens == cached and eng.block_manager.prefix_host_hits == cached
    assert out.token_ids == ref.generate([turn2], greedy)[0].token_ids
    assert eng.stats().kv_blocks_moved["promoted"] == cached // 4


def test_abort_while_swapped_out_ends_the_request_and_frees_its_blocks() -> None:
    eng = engine(swap_space_gb=0.01, preemption_mode="swap")
    eng.add_request("a", prompts(6, 1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", prompts(7, 1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    victim = next(s for s in eng.scheduler.running if s.request_id == "a")
    eng.scheduler.preempt(victim)
    assert victim in eng.scheduler.swapped
    final = eng.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    eng.check_invariants()
    eng.abort_request("b")
    while eng.has_unfinished_requests():
        eng.step()
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_host_blocks == bm.num_host_blocks

"""Greedy token-for-token equality with Hugging Face transformers (fp32) on tiny random-weight models of each
architecture: batched mixed lengths, arrivals mid-run, prefix-cache hits, small chunk budgets, preemption."""

from __future__ import annotations

import random

import pytest
import torch

from drift_agent.core.config import EngineConfig
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.llm_engine import LLMEngine
from tests.tiny_models import ARCHS, tiny_model_dir

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_models():
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            path = tiny_model_dir(arch)
            cache[arch] = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        return cache[arch]

    return get


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Reference: full recompute each step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def prompts(seed: int, count: int, lo: int, hi: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def engine(arch: str, **kw) -> LLMEngine:
    base = dict(model=str(tiny_model_dir(arch)), block_size=4, num_kv_blocks=256, max_num_batched_tokens=256)
    return LLMEngine(EngineConfig(**(base | kw)))


def check(eng: LLMEngine, hf, ps: list[list[int]], lens: list[int]) -> None:
    outs = eng.generate(ps, [SamplingParams(max_tokens=n, **GREEDY) for n in lens])
    for p, n, out in zip(ps, lens, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, p, n), f"prompt of {len(p)} tokens diverged"
        assert out.finish_reason == "length"
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["chunked", "prefill-first"])
def test_batched_mixed_lengths(arch, policy, hf_models):
    ps = prompts(1, 5, 3, 40)
    check(engine(arch, policy=policy), hf_models(arch), ps, [12, 3, 9, 1, 7])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_small_chunk_budget(arch, hf_models):
    ps = prompts(2, 4, 20, 60)
    check(engine(arch, policy="chunked", max_num_batched_tokens=16), hf_models(arch), ps, [6, 6, 4, 8])


@pytest.mark.parametrize("policy", ["chunked", "prefill-first"])
def test_forced_preemption_with_tiny_pool(policy, hf_models):
    eng = engine("llama", policy=policy, num_kv_blocks=14, max_num_batched_tokens=64)
    ps = prompts(3, 4, 8, 14)
    check(eng, hf_models("llama"), ps, [16, 16, 16, 16])
    assert eng.scheduler.num_preemptions > 0


def test_requests_arriving_mid_run(hf_models):
    eng = engine("qwen2")
    hf = hf_models("qwen2")
    first, late = prompts(4, 3, 5, 30), prompts(5, 3, 5, 30)
    p = SamplingParams(max_tokens=10, **GREEDY)
    for i, pr in enumerate(first):
        eng.add_request(f"a{i}", pr, p)
    done = {}
    for step in range(200):
        if step == 3:
            for i, pr in enumerate(late):
                eng.add_request(f"b{i}", pr, p)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if len(done) == 6:
            break
    for i, pr in enumerate(first):
        assert done[f"a{i}"] == hf_greedy(hf, pr, 10)
    for i, pr in enumerate(late):
        assert done[f"b{i}"] == hf_greedy(hf, pr, 10)


def test_prefix_cache_shared_system_prompt_and_multi_turn(hf_models):
    eng = engine("llama3")
    hf = hf_models("llama3")
    system = prompts(6, 1, 24, 24)[0]
    users = prompts(7, 3, 4, 9)
    check(eng, hf, [system + users[0]], [5])
    hits_before = eng.block_manager.prefix_hits
    check(eng, hf, [system + u for u in users[1:]], [5, 5])
    assert eng.block_manager.prefix_hits - hits_before >= 2 * 24 - 8  # whole blocks of the system prompt
    # Multi-turn: turn 2 resends turn 1 with its answer; its KV is reused in place.
    turn1 = system + users[0]
    ans = eng.generate([turn1], SamplingParams(max_tokens=8, **GREEDY))[0].token_ids
    turn2 = turn1 + ans + users[1]
    out = eng.generate([turn2], SamplingParams(max_tokens=6, **GREEDY))[0]
    assert out.num_cached_tokens >= (len(turn1) + len(ans)) // 4 * 4 - 4
    assert out.token_ids == hf_greedy(hf, turn2, 6)


def test_abort_any_time_frees_blocks():
    eng = engine("llama")
    p = SamplingParams(max_tokens=50, **GREEDY)
    for i, pr in enumerate(prompts(8, 4, 10, 20)):
        eng.add_request(f"r{i}", pr, p)
    eng.abort_request("r3")  # still waiting
    eng.step()
    eng.abort_request("r0")  # running
    eng.step()
    for rid in ("r1", "r2"):
        eng.abort_request(rid)
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.requests and not eng.runner.generators

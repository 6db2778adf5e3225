"""LLMEngine / AsyncLLMEngine API: bad input raises typed errors and leaks nothing; streaming and abort;
the embedded default model answers sensibly."""

from __future__ import annotations

import asyncio

import pytest

from drift_agent.core.config import EngineConfig
from drift_agent.core.errors import EngineOverloadedError, InvalidRequestError, PromptTooLongError
from drift_agent.core.sampling_params import SamplingParams
from drift_agent.core.sequence import SLO
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from tests.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def eng() -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), num_kv_blocks=8, block_size=16))


@pytest.mark.parametrize(
    "prompt, params, error, match",
    [
        ("", None, InvalidRequestError, "empty"),
        ([], None, InvalidRequestError, "at least one token"),
        ([1, 2, 10**9], None, InvalidRequestError, "token ids"),
        ("hi", dict(max_tokens=0), InvalidRequestError, "max_tokens"),
        ("hi", dict(max_tokens=-3), InvalidRequestError, "max_tokens"),
        ("hi", dict(temperature=-1), InvalidRequestError, "temperature"),
        ("hi", dict(top_p=0), InvalidRequestError, "top_p"),
        ("hi", dict(top_k=-5), InvalidRequestError, "top_k"),
        ("hi", dict(logprobs=99), InvalidRequestError, "logprobs"),
        ("hi", dict(stop=[""]), InvalidRequestError, "stop"),
        ([5] * 200, None, PromptTooLongError, "context window is 128"),
    ],
)
def test_bad_input_raises_typed_error_and_leaks_nothing(eng, prompt, params, error, match):
    with pytest.raises(error, match=match):
        eng.add_request("bad", prompt, SamplingParams(**params) if params else None)
    assert not eng.has_unfinished_requests() and not eng.requests
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_context_window_is_capped_to_the_pool_and_enforced(eng):
    assert eng.max_model_len == 128  # 8 blocks x 16 tokens, below the model's 512
    with pytest.raises(PromptTooLongError, match="context window"):
        eng.add_request("long", [5] * 128)


def test_requests_without_targets_get_the_defaults_of_their_arrival_in_seconds(eng):
    """Missing targets are filled in when a request is queued; a later change of the defaults (the admin API)
    reaches only the requests queued after it."""
    ttft_ms, tpot_ms = eng.config.slo_ttft_ms, eng.config.slo_tpot_ms
    eng.add_request("no-slo", "hello")
    eng.add_request("own", "hello", slo=SLO.from_ms(300, None, priority=1))
    try:
        eng.update_settings(slo_ttft_ms=2 * ttft_ms)
        eng.add_request("later", "hello")
        assert eng.requests["no-slo"].seq.slo == SLO(ttft_ms / 1e3, tpot_ms / 1e3)
        assert eng.requests["own"].seq.slo == SLO(0.3, tpot_ms / 1e3, priority=1)
        assert eng.requests["later"].seq.slo == SLO(2 * ttft_ms / 1e3, tpot_ms / 1e3)
    finally:
        eng.update_settings(slo_ttft_ms=ttft_ms)
        for rid in ("no-slo", "own", "later"):
            eng.abort_request(rid)


def test_duplicate_request_id(eng):
    eng.add_request("dup", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        eng.add_request("dup", "hello")
    eng.abort_request("dup")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_output_is_capped_by_the_context_window(eng):
    out = eng.generate([[7] * 120], SamplingParams(max_tokens=None, ignore_eos=True, temperature=0))[0]
    assert out.finish_reason == "length" and out.num_output_tokens == 8


async def test_async_engine_streams_aborts_and_bounds_its_queue():
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model_dir("llama")), num_kv_blocks=64, max_waiting_requests=2)
    )
    aeng = AsyncLLMEngine(engine)
    aeng.start()
    try:
        stream = await aeng.generate("hello there", SamplingParams(max_tokens=5, ignore_eos=True), "a")
        deltas = [out async for out in stream]
        assert deltas[-1].finished and sum(len(o.delta_token_ids) for o in deltas) == 5
        assert "".join(o.delta_text for o in deltas) == deltas[-1].text
        # Leaving a stream early aborts the request; dropping one unread does too.
        stream = await aeng.generate("hello", SamplingParams(max_tokens=500, ignore_eos=True), "b")
        async for _ in stream:
            break
        await stream.aclose()
        unread = await aeng.generate("hello", SamplingParams(max_tokens=500, ignore_eos=True), "c")
        del unread
        for _ in range(200):
            await asyncio.sleep(0.02)
            s = aeng.stats()
            if s.num_running == s.num_waiting == 0:
                break
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        # Bad input raises before streaming; a full queue is EngineOverloadedError.
        with pytest.raises(InvalidRequestError):
            await aeng.generate("", SamplingParams())
        aeng._stats.num_waiting = 2  # as if two requests were queued
        with pytest.raises(EngineOverloadedError):
            await aeng.generate("x", SamplingParams())
    finally:
        aeng.shutdown()


@pytest.mark.slow
def test_embedded_model_answers_sensibly():
    eng = LLMEngine(EngineConfig(max_model_len=512, kv_cache_memory_gb=0.1))
    prompt = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text

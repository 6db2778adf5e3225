"""Many concurrent streaming clients, some leaving early: every request completes or is aborted, and the KV
pool is empty again afterwards."""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.server.conftest import MODEL, LiveServer, wait_idle

NUM_CLIENTS = 60
NUM_LEAVING = 20
FULL_TOKENS = 16


def _success(m: dict, reason: str) -> float:
    return m[("vllm:request_success_total", frozenset({("model_name", MODEL), ("finished_reason", reason)}))]


async def test_concurrent_streams_with_disconnects(live: LiveServer, tiny_engine) -> None:
    before = live.metrics()
    client = openai.AsyncOpenAI(base_url=live.base_url, api_key="x", max_retries=0)

    async def full(i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}"}],
            max_tokens=FULL_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        return finish, usage.completion_tokens

    async def leaving(i: int) -> int:
        # Long enough that it cannot finish before the server notices the client is gone.
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Story number {i}:",
            max_tokens=450,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.close()
        return got

    jobs = [leaving(i) if i % 3 == 0 else full(i) for i in range(NUM_CLIENTS)]
    results = await asyncio.gather(*jobs)
    await client.close()

    completed = [r for r in results if isinstance(r, tuple)]
    assert len(completed) == NUM_CLIENTS - NUM_LEAVING
    assert all(r == ("length", FULL_TOKENS) for r in completed)
    assert [r for r in results if isinstance(r, int)] == [2] * NUM_LEAVING

    after = wait_idle(live)
    lab = frozenset({("model_name", MODEL)})
    assert after[("vllm:num_requests_running", lab)] == 0
    assert after[("vllm:kv_cache_usage_perc", lab)] == 0
    assert after[("drift_kv_cache_blocks_free", lab)] == after[("drift_kv_cache_blocks_total", lab)]
    assert _success(after, "length") - _success(before, "length") == NUM_CLIENTS - NUM_LEAVING
    assert _success(after, "abort") - _success(before, "abort") == NUM_LEAVING
    assert not tiny_engine.requests  # internal probe: the engine holds nothing


def test_non_streaming_client_timeout_aborts(live: LiveServer) -> None:
    before = live.metrics()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": True}
    try:
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.3)
        raise AssertionError("the request should not finish within 0.3 s")
    except httpx.TimeoutException:
        pass
    after = wait_idle(live)
    lab = frozenset({("model_name", MODEL)})
    assert after[("vllm:kv_cache_usage_perc", lab)] == 0
    assert _success(after, "abort") - _success(before, "abort") == 1

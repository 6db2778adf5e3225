"""A bounded waiting queue: past it, 429 with Retry-After; whatever was accepted runs to completion."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from tests.server.conftest import LiveServer, start_server, tiny_engine_config

TOKENS = 40


@pytest.fixture(scope="module")
def small_live() -> Iterator[LiveServer]:
    engine = AsyncLLMEngine(
        LLMEngine(tiny_engine_config(max_num_seqs=1, max_waiting_requests=2, num_kv_blocks=64))
    )
    live = start_server(engine)
    yield live
    live.stop()
    engine.shutdown()


async def test_overload_gets_429_and_accepted_complete(small_live: LiveServer) -> None:
    body = {"prompt": "Hello", "max_tokens": TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=small_live.url, timeout=60) as http:
        responses = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == TOKENS
                assert r.json()["choices"][0]["finish_reason"] == "length"
        # Overload is momentary: once the queue drained the server accepts again.
        assert (await http.post("/v1/completions", json=body)).status_code == 200


def test_engine_death_is_reported_not_dropped() -> None:
    """If the engine loop dies, every accepted request still gets an answer: an error event or a 503."""
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(num_kv_blocks=64)))
    steps = {"n": 0}

    def die_after_some_steps(_engine, _outputs) -> None:
        steps["n"] += 1
        if steps["n"] == 5:
            raise RuntimeError("simulated CUDA error")

    engine.step_hooks.append(die_after_some_steps)
    live = start_server(engine)
    try:
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
        with live.client() as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2][len("data: ") :])["error"]
            assert error["code"] == "engine_dead" and "simulated CUDA error" in error["message"]
            after = http.post("/v1/completions", json=body)
            assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"
            assert http.get("/ready").status_code == 503
            assert http.get("/health").status_code == 503  # liveness fails: the pod is restarted
    finally:
        live.stop()
        engine.shutdown()

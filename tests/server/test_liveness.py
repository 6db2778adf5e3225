"""Liveness tells the truth: a request that fails in the engine gets an error response (JSON body or SSE error
event) while the server goes on serving and /health stays 200; a dead engine loop turns /health into 503 and
`drift_engine_up` into 0, and the gauges read from the engine do not stay frozen."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from drift_agent.engine.detokenizer import IncrementalDetokenizer
from tests.server.conftest import MODEL, LiveServer

LABELS = frozenset({("model_name", MODEL)})
NORMAL = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
FAULT_MARKER = "<injected-fault>"


def assert_error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    return error


def sse_events(http: httpx.Client, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def assert_still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json=NORMAL)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": 1, "seed": 18446744073709551616},
        {"prompt": "hi", "max_tokens": 3, "n": 2, "seed": 18446744073709551615},
    ],
    ids=["seed-out-of-range", "seed-plus-choice-overflows"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_seed_gets_an_error_and_the_server_lives_on(live: LiveServer, body, stream) -> None:
    with live.client() as http:
        r = http.post("/v1/completions", json={**body, "stream": stream})
        error = assert_error_body(r, 400)
        assert "seed" in error["message"]
        assert_still_serving(http)
    assert live.async_engine.is_running


@pytest.fixture
def detokenizer_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests with the stop string FAULT_MARKER fail in their detokenizer (on the engine thread)."""
    real = IncrementalDetokenizer.update

    def update(self: IncrementalDetokenizer, new_ids: list[int], **kw: Any) -> str | None:
        if FAULT_MARKER in self._stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return real(self, new_ids, **kw)

    monkeypatch.setattr(IncrementalDetokenizer, "update", update)


def test_request_failing_in_the_engine_gets_an_error_response(live: LiveServer, detokenizer_fault) -> None:
    faulty = {**NORMAL, "stop": [FAULT_MARKER]}
    with live.client() as http:
        error = assert_error_body(http.post("/v1/completions", json=faulty), 500)
        assert "injected detokenizer fault" in error["message"]

        lines = sse_events(http, faulty)
        assert lines[-1] == "data: [DONE]"
        event = json.loads(lines[-2][len("data: ") :])
        assert "injected detokenizer fault" in event["error"]["message"]

        # A choice failing fails its whole response; its sibling choices' blocks are freed all the same.
        assert_error_body(http.post("/v1/completions", json={**faulty, "n": 3}), 500)
        assert_still_serving(http)
    assert live.async_engine.is_running
    live.async_engine.engine.block_manager.check_invariants()


def test_dead_engine_loop_fails_liveness_and_metrics_say_so(doomed: LiveServer) -> None:
    with doomed.client() as http:
        assert_still_serving(http)
        assert doomed.metric("drift_engine_up", model_name=MODEL) == 1

        def device_fault(batch: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        engine = doomed.async_engine.engine
        engine.runner.forward_logits = device_fault  # type: ignore[method-assign]
        error = assert_error_body(http.post("/v1/completions", json=NORMAL), 503)
        assert error["code"] == "engine_dead"

        health = http.get("/health")
        assert health.status_code == 503
        reason = health.json()["error"]
        assert reason["code"] == "engine_dead" and "illegal memory access" in reason["message"]
        assert http.get("/ready").status_code == 503
        assert_error_body(http.post("/v1/completions", json=NORMAL), 503)

    # The engine's last snapshot still counts the request that was open when the loop died; the gauges don't.
    frozen = doomed.async_engine.stats()
    assert frozen.num_running + frozen.num_waiting == 1
    metrics = doomed.metrics()
    assert metrics[("drift_engine_up", LABELS)] == 0
    assert metrics[("vllm:num_requests_running", LABELS)] == 0
    assert metrics[("vllm:num_requests_waiting", LABELS)] == 0
    # No live KV pool to describe: omitted rather than frozen.
    assert ("vllm:kv_cache_usage_perc", LABELS) not in metrics
    assert ("drift_kv_cache_blocks_free", LABELS) not in metrics
    assert metrics[("drift_kv_cache_blocks_total", LABELS)] == 64

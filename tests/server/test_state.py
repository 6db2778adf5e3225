"""GET /state, the agent's state for `drift router`: its schema, figures that follow the load, answers from the
stats snapshot without waiting for the engine thread, and a 200 with `engine_up: false` once the loop died."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.engine.outputs import StepCosts
from tests.server.conftest import MODEL, LiveServer, start_server, tiny_engine_config

KEYS = {
    "model", "ready", "draining", "engine_up", "waiting", "running", "pending_prefill_tokens",
    "kv_blocks_total", "kv_blocks_free", "kv_used_tokens", "block_size", "max_num_seqs",
    "max_num_batched_tokens", "prefix_cache", "policy", "split", "perf", "slo", "time",
}  # fmt: skip
PROMPT = list(range(10, 210))  # 200 token ids: a prefill large enough to be measured (StepCosts)


def get_state(http: httpx.Client) -> dict[str, Any]:
    r = http.get("/state")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def own() -> Iterator[LiveServer]:
    """A server of its own: two sequence slots and 64-token chunks, so requests wait and prefill in chunks."""
    engine = AsyncLLMEngine(
        LLMEngine(tiny_engine_config(num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=64))
    )
    server = start_server(engine)
    yield server
    server.stop()
    engine.shutdown()


def test_schema(live: LiveServer) -> None:
    with live.client() as http:
        s = get_state(http)
        assert set(s) == KEYS
        assert s["model"] == MODEL and s["ready"] and s["engine_up"] and not s["draining"]
        for key in ("waiting", "running", "pending_prefill_tokens", "kv_used_tokens", "kv_blocks_free"):
            assert isinstance(s[key], int) and s[key] >= 0
        assert (s["kv_blocks_total"], s["block_size"], s["max_num_seqs"]) == (512, 16, 96)
        assert s["kv_used_tokens"] == (s["kv_blocks_total"] - s["kv_blocks_free"]) * s["block_size"]
        assert s["max_num_batched_tokens"] >= 16
        assert set(s["prefix_cache"]) == {"enabled", "queries", "hits"}
        assert s["policy"] == "chunked" and s["split"] is None
        assert set(s["perf"]) == {"prefill_s_per_token", "decode_step_s", "decode_batch"}
        assert set(s["slo"]) == {"ttft_ms", "tpot_ms", "attainment", "window_s"}
        assert (s["slo"]["ttft_ms"], s["slo"]["tpot_ms"], s["slo"]["window_s"]) == (1000.0, 100.0, 60.0)
        assert abs(s["time"] - time.time()) < 5
        documented = http.get("/openapi.json").json()
        assert "/state" in documented["paths"] and "AgentState" in documented["components"]["schemas"]


def test_values_follow_the_load_and_answer_while_the_engine_thread_is_busy(own: LiveServer) -> None:
    engine = own.async_engine.engine
    hold, held = threading.Event(), threading.Event()

    def block_once_busy(eng: Any, outputs: Any) -> None:  # a step hook: runs on the engine thread
        sched = eng.scheduler
        if sched.num_running + sched.num_waiting == 4 and sched.num_waiting and not held.is_set():
            held.set()
            hold.wait(20)

    own.async_engine.step_hooks.append(block_once_busy)
    body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True}
    results: list[int] = []

    def send() -> None:
        with own.client() as c:
            results.append(c.post("/v1/completions", json=body).status_code)

    with own.client() as http:
        idle = get_state(http)
        assert idle["waiting"] == idle["running"] == idle["pending_prefill_tokens"] == 0
        assert idle["kv_used_tokens"] == 0 and idle["slo"]["attainment"] is None
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            assert held.wait(20), "the engine never had requests running and waiting at once"
            # The engine thread is stuck in the hook: /state still answers, quickly, from the snapshot.
            started = time.perf_counter()
            polls = [get_state(http) for _ in range(20)]
            elapsed = time.perf_counter() - started
            busy = polls[-1]
            assert elapsed < 2.0, f"20 polls took {elapsed:.2f}s"
            assert busy["running"] + busy["waiting"] == 4 and busy["waiting"] >= 2 and busy["running"] >= 1
            # The waiting prompts have no KV yet: at least their 200 tokens each are pending.
            assert busy["pending_prefill_tokens"] >= busy["waiting"] * len(PROMPT)
            assert busy["kv_used_tokens"] > 0 and busy["kv_blocks_free"] < busy["kv_blocks_total"]
        finally:
            hold.set()
            for t in threads:
                t.join(60)
            own.async_engine.step_hooks.remove(block_once_busy)
        assert results == [200] * 4
        deadline = time.monotonic() + 10
        while (done := get_state(http))["running"] or done["waiting"]:
            assert time.monotonic() < deadline, done
            time.sleep(0.02)
    assert done["pending_prefill_tokens"] == 0 and done["kv_used_tokens"] == 0
    assert done["perf"]["prefill_s_per_token"] > 0 and done["perf"]["decode_step_s"] > 0
    assert 1 <= done["perf"]["decode_batch"] <= 2
    assert done["slo"]["attainment"] is not None and 0.0 <= done["slo"]["attainment"] <= 1.0
    assert engine.stats().pending_prefill_tokens == 0


def test_pending_prefill_tokens_count_what_has_no_kv_yet() -> None:
    engine = LLMEngine(tiny_engine_config(num_kv_blocks=64, max_num_seqs=1, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", PROMPT, params)
    engine.add_request("b", PROMPT[:50], params)
    assert engine.stats().pending_prefill_tokens == 250
    engine.step()  # a's first 64-token chunk; b waits for the slot
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.pending_prefill_tokens) == (1, 1, 250 - 64)
    while engine.scheduler.running and engine.scheduler.running[0].is_prefilling:
        engine.step()
    assert engine.stats().pending_prefill_tokens == 50  # a decodes; its newest token does not count
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().pending_prefill_tokens == 0


def test_step_costs_are_weighted_means() -> None:
    costs = StepCosts()
    assert costs.prefill_s_per_token is None and costs.decode_step_s is None and costs.decode_batch == 0
    costs.prefill(1.0, 64)  # too small a prefill to say anything about a queue
    assert costs.prefill_s_per_token is None
    costs.prefill(1.0, 500)
    costs.prefill(2.0, 400, 500)  # decode rows of a mixed batch are charged as prefill work
    assert costs.prefill_s_per_token == pytest.approx(0.002 + StepCosts.ALPHA * (0.004 - 0.002))
    costs.decode(0.01, 8)
    costs.decode(0.02, 18)
    assert costs.decode_step_s == pytest.approx(0.01 + StepCosts.ALPHA * 0.01)
    assert costs.decode_batch == 10


def test_state_answers_200_with_engine_up_false_once_the_loop_died(doomed: LiveServer) -> None:
    def device_fault(batch: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with doomed.client() as http:
        assert get_state(http)["engine_up"]
        doomed.async_engine.engine.runner.forward_logits = device_fault  # type: ignore[method-assign]
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 503
        s = get_state(http)
    assert set(s) == KEYS
    assert not s["engine_up"] and not s["ready"]
    # The dead loop failed the request the frozen snapshot still counts: the queue reads empty.
    assert s["running"] == s["waiting"] == s["pending_prefill_tokens"] == 0
    assert s["kv_blocks_total"] == 64


def test_multiplexed_lanes_are_measured_too() -> None:
    engine = LLMEngine(tiny_engine_config(num_kv_blocks=64, policy="drift"))
    outs = engine.generate([PROMPT, PROMPT[:150]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.num_output_tokens for o in outs] == [8, 8]
    stats = engine.stats()
    assert stats.split is not None and stats.pending_prefill_tokens == 0
    assert stats.decode_step_s is not None and stats.decode_step_s > 0 and stats.decode_batch >= 1
    assert stats.prefill_s_per_token is not None and stats.prefill_s_per_token > 0

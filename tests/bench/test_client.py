"""The streaming client and runner end to end against an in-test OpenAI-like server on loopback."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from drift_agent.bench import ServerUnreachableError
from drift_agent.bench.arrivals import arrival_times
from drift_agent.bench.client import ClientConfig, OpenAIClient, SSEDecoder, sse_lines
from drift_agent.bench.metrics import GoodputTargets, RequestRecord
from drift_agent.bench.runner import LoadConfig, probe, run_load, run_sweep, warm_up
from drift_agent.bench.sweep import Bisection
from drift_agent.bench.workloads import RequestSpec, WorkloadParams, generate

from .mock_server import MODEL, MockServer, free_port_url


def config(url: str, **kw) -> ClientConfig:
    return ClientConfig(base_url=url, model=MODEL, **kw)


def spec(i: int, prompt: str = "hello there", out: int = 5, **kw) -> RequestSpec:
    return RequestSpec(f"r{i}", prompt, 2, out, session_id=kw.pop("session_id", f"r{i}"), **kw)


def test_sse_decoder() -> None:
    d = SSEDecoder()
    assert d.feed(": ping") is None
    assert d.feed("event: message") is None
    assert d.feed('data: {"a":') is None
    assert d.feed("data:1}") is None
    assert d.feed("") == '{"a":\n1}'
    assert d.feed("") is None
    assert d.feed("data: [DONE]\r") is None and d.flush() == "[DONE]"


async def test_sse_lines_split_at_newlines_only() -> None:
    # A server may send U+2028, U+2029 or U+0085 raw inside an event's JSON; they are not line breaks in SSE.
    event = json.dumps({"text": "a\u2028b\u2029c\x85d"}, ensure_ascii=False)
    resp = httpx.Response(200, content=f"data: {event}\r\n\r\ndata: [DONE]\n\n".encode())
    lines = [line async for line in sse_lines(resp)]
    assert lines == [f"data: {event}\r", "\r", "data: [DONE]", ""]
    d = SSEDecoder()
    assert [data for line in lines if (data := d.feed(line))] == [event, "[DONE]"]


async def test_completions_timing_and_request_shape(mock: MockServer) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.1, 0.02
    slo = GoodputTargets(ttft_ms=500, tpot_ms=50)
    async with OpenAIClient(config(mock.url, slo=slo)) as client:
        rec = await client.send(RequestRecord("r0"), "hello there", 6)
    assert rec.success, rec.error
    assert 0.1 <= rec.ttft < 0.1 + 0.08
    assert len(rec.itl) == 5 and rec.output_tokens == 6 and rec.prompt_tokens == 7  # from usage
    assert 0.015 <= float(np.median(rec.itl)) < 0.06
    assert rec.latency == pytest.approx(rec.ttft + sum(rec.itl), abs=1e-6)
    assert rec.tpot == pytest.approx(sum(rec.itl) / 5)
    assert rec.generated_text == "".join(f" w{i}" for i in range(6))
    sent = mock.state.requests[-1]
    body, headers = sent["body"], sent["headers"]
    assert body["prompt"] == "hello there" and body["max_tokens"] == 6 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 6
    assert headers["x-slo-ttft-ms"] == "500" and headers["x-slo-tpot-ms"] == "50"
    assert headers["x-request-id"] == "r0"


async def test_chat_role_chunk_is_not_the_first_token(mock: MockServer) -> None:
    # The mock sends its role chunk at once and the first token after 0.15 s.
    mock.state.ttft_s = 0.15
    async with OpenAIClient(config(mock.url, endpoint="chat", ignore_eos=False, temperature=0.0)) as client:
        rec = await client.send(RequestRecord("c"), [{"role": "user", "content": "hi"}], 4)
    assert rec.success and rec.ttft >= 0.15 and len(rec.itl) == 3 and rec.output_tokens == 4
    body = mock.state.requests[-1]["body"]
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_completion_tokens"] == 4 and body["temperature"] == 0.0
    assert "ignore_eos" not in body and "min_tokens" not in body


async def test_token_count_falls_back_to_chunks(mock: MockServer) -> None:
    mock.state.send_usage = False
    async with OpenAIClient(config(mock.url, extra_body={"top_k": 1})) as client:
        rec = await client.send(RequestRecord("x", prompt_tokens=11), "hi", 3)
    assert rec.success and rec.output_tokens == 3 and rec.prompt_tokens == 11
    assert mock.state.requests[-1]["body"]["top_k"] == 1


async def test_errors_are_recorded_not_raised(mock: MockServer) -> None:
    async with OpenAIClient(config(mock.url)) as client:
        failed = await client.send(RequestRecord("f"), "please FAIL", 3)
        wrong_model = OpenAIClient(ClientConfig(base_url=mock.url, model="nope"))
        missing = await wrong_model.send(RequestRecord("m"), "hi", 3)
        await wrong_model.http.aclose()
    assert not failed.success and failed.error.startswith("HTTP 500") and "synthetic failure" in failed.error
    assert not missing.success and "HTTP 404" in missing.error
    async with OpenAIClient(config(free_port_url())) as client:
        down = await client.send(RequestRecord("d"), "hi", 3)
        assert not down.success and "ConnectError" in down.error
        with pytest.raises(ServerUnreachableError, match="cannot reach"):
            await client.list_models()


async def test_probe_rejects_a_wrong_model(mock: MockServer) -> None:
    async with OpenAIClient(config(mock.url)) as client:
        assert await client.list_models() == [MODEL]
        await probe(client, spec(0))
    async with OpenAIClient(ClientConfig(base_url=mock.url, model="nope")) as client:
        with pytest.raises(ServerUnreachableError, match="probe request .* failed: HTTP 404"):
            await probe(client, spec(0))


async def test_run_follows_the_arrival_schedule(mock: MockServer) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.02, 0.005
    specs = [spec(i, out=3) for i in range(8)]
    load = LoadConfig(burstiness=1.0, seed=3, slo=GoodputTargets(ttft_ms=2000))
    done: list[str] = []
    async with OpenAIClient(config(mock.url)) as client:
        result = await run_load(client, specs, 20.0, load, on_done=lambda r: done.append(r.request_id))
    expected = arrival_times(8, 20.0, 1.0, seed=3)
    starts = np.array([r.start_time for r in result.records])
    assert np.all(starts >= expected - 1e-3) and np.all(starts < expected + 0.1)
    assert sorted(done) == sorted(s.request_id for s in specs)
    s = result.summary
    assert s["completed"] == 8 and s["slo_attainment"] == 1.0 and s["total_output_tokens"] == 24
    assert result.duration_s >= expected[-1]
    assert result.to_run()["request_rate"] == 20.0 and "requests" not in result.to_run()
    assert len(result.to_run(with_requests=True)["requests"]) == 8


async def test_max_concurrency_bounds_requests_in_flight(mock: MockServer) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.03, 0.0
    specs = [spec(i, out=2) for i in range(6)]
    async with OpenAIClient(config(mock.url, max_connections=2)) as client:
        result = await run_load(client, specs, math.inf, LoadConfig(max_concurrency=2))
    assert mock.state.peak_in_flight == 2
    assert result.summary["max_concurrent_requests"] <= 2
    # Requests queued behind the semaphore were due at t=0 but sent later.
    assert max(r.start_time - r.scheduled_time for r in result.records) > 0.02


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_multi_turn_resends_the_conversation(mock: MockServer, endpoint: str) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.01, 0.0
    turns = [
        spec(0, "first question", out=2, session_id="s", turn=0),
        spec(1, "second question", out=3, session_id="s", turn=1, think_time_s=0.05),
    ]
    async with OpenAIClient(config(mock.url, endpoint=endpoint)) as client:
        result = await run_load(client, turns, math.inf, LoadConfig())
    assert result.summary["completed"] == 2
    first, second = (r["body"] for r in mock.state.requests[-2:])
    if endpoint == "chat":
        assert second["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": " w0 w1"},
            {"role": "user", "content": "second question"},
        ]
    else:
        assert second["prompt"] == first["prompt"] + " w0 w1\n" + "second question"
    gap = mock.state.requests[-1]["t"] - mock.state.requests[-2]["t"]
    assert gap >= 0.05  # think time after the first answer


async def test_failed_turn_aborts_the_rest_of_its_session(mock: MockServer) -> None:
    turns = [spec(0, "FAIL now", session_id="s", turn=0), spec(1, "later", session_id="s", turn=1)]
    async with OpenAIClient(config(mock.url)) as client:
        result = await run_load(
            client, [*turns, spec(2)], math.inf, LoadConfig(slo=GoodputTargets(ttft_ms=1000))
        )
    errors = [r.error for r in result.records]
    assert errors[0].startswith("HTTP 500") and errors[1].startswith("not sent") and errors[2] == ""
    assert result.summary["failed"] == 2 and result.summary["slo_attainment"] == pytest.approx(1 / 3)


async def test_warm_up_and_generated_workload(mock: MockServer) -> None:
    mock.state.ttft_s, mock.state.itl_s = 0.0, 0.0
    specs = generate("multi-turn", 6, seed=1, params=WorkloadParams(output_len=2, think_time_s=0.0))
    async with OpenAIClient(config(mock.url, endpoint="chat")) as client:
        warm = await warm_up(client, specs[:2], max_concurrency=1)
        assert all(r.success for r in warm) and warm[0].request_id.startswith("warmup-")
        result = await run_load(client, specs, 50.0, LoadConfig())
    assert result.summary["completed"] == 6


async def test_live_sweep_brackets_the_overload_point(mock: MockServer) -> None:
    # TTFT grows by 100 ms per other stream in flight, so an 80 ms TTFT SLO holds only while requests do not
    # overlap: at 5 req/s they are 200 ms apart and last ~10 ms; at 300 req/s all six overlap.
    mock.state.ttft_s, mock.state.itl_s, mock.state.ttft_per_stream_s = 0.01, 0.0, 0.1
    specs = [spec(i, out=2) for i in range(6)]
    load = LoadConfig(burstiness=float("inf"), slo=GoodputTargets(ttft_ms=80))  # evenly spaced arrivals
    async with OpenAIClient(config(mock.url)) as client:
        runs, result = await run_sweep(client, specs, Bisection(5, 300, 0.9, max_iters=2), load)
    assert [r.request_rate for r in runs] == [rate for rate, _ in result.history]
    assert len(runs) == 4 and result.saturated
    assert result.history[0][1] < 0.9 <= result.history[1][1]
    assert result.max_rate is not None and 5 <= result.max_rate < 300
    with pytest.raises(ValueError, match="needs an SLO"):
        await run_sweep(client, specs, Bisection(1, 2), LoadConfig())

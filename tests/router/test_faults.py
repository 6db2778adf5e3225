"""Bad input and faults, against fake agents: refusals with Retry-After, a backend that hangs before its first
byte, one that dies mid-stream, a client that leaves, no ready backend, bad bodies, unknown models/routes."""

from __future__ import annotations

import json
import sys
import time
import types
from typing import Any

import httpx
import pytest

import drift_agent.router
from tests.router.conftest import MODEL, Harness, wait_until

COMPLETION = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}


def _events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def _assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


def test_a_refusal_is_retried_elsewhere_and_the_refuser_skipped_for_its_window(harness: Harness) -> None:
    full, ok = harness.fake(mode="refuse", retry_after="30"), harness.fake()
    router = harness.router([full.url, ok.url], policy="round-robin")
    for i in range(4):
        r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": i % 2 == 0})
        assert r.status_code == 200, r.text
        assert r.headers["x-drift-backend"] == ok.url
    assert len(full.requests) == 1  # refused once, then out of rotation for its Retry-After
    assert len(ok.requests) == 4
    assert router.metric("drift_router_retries_total", backend=full.url, reason="429") == 1
    assert router.metric("drift_router_ejections_total", backend=full.url, reason="refused") == 1
    assert router.metric("drift_router_decisions_total", policy="round-robin", reason="retry") == 1
    assert router.metric("drift_router_requests_total", backend=ok.url, code="200") == 4


def test_when_every_backend_refuses_the_client_gets_the_refusal_with_retry_after(harness: Harness) -> None:
    a, b = harness.fake(mode="refuse", retry_after="2"), harness.fake(mode="refuse", retry_after="3")
    router = harness.router([a.url, b.url])
    r = httpx.post(f"{router.url}/v1/completions", json=COMPLETION)
    _assert_openai_error(r, 429, "overloaded")
    assert r.headers["Retry-After"] in ("2", "3")
    assert len(a.requests) == len(b.requests) == 1  # each tried once: bounded attempts
    # Both are now in their windows: nothing is routable, so the next request is answered at once.
    r = httpx.post(f"{router.url}/v1/completions", json=COMPLETION)
    _assert_openai_error(r, 503, "no_ready_backend")
    assert r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("stream", [True, False])
def test_a_backend_that_hangs_before_its_first_byte_times_out_and_the_request_goes_elsewhere(
    harness: Harness, stream: bool
) -> None:
    hung, ok = harness.fake(mode="hang"), harness.fake()
    router = harness.router(
        [hung.url, ok.url], policy="round-robin", first_byte_timeout_s=0.3, request_timeout_s=0.3
    )
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": stream}, timeout=20)
    assert r.status_code == 200, r.text
    assert r.headers["x-drift-backend"] == ok.url
    assert len(hung.requests) == 1
    assert router.metric("drift_router_retries_total", backend=hung.url, reason="timeout") == 1
    if stream:
        assert _events(r.text)[-1] == "[DONE]"


@pytest.mark.parametrize("mode", ["die-before-first", "die-after-role", "stall-before-first"])
def test_a_stream_that_fails_before_its_first_event_goes_elsewhere(harness: Harness, mode: str) -> None:
    """The agent accepted the stream (headers sent, maybe a chat's opening role chunk) but died or stalled before
    its first token: the client has received nothing yet, so the request goes to another agent instead of
    failing."""
    bad, ok = harness.fake(mode=mode), harness.fake()
    # The defaults scaled down: the stall is caught by the first-token timeout, not the 300 s idle one.
    router = harness.router(
        [bad.url, ok.url], policy="round-robin", first_byte_timeout_s=0.3, first_token_timeout_s=0.5
    )
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}, timeout=20)
    assert r.status_code == 200, r.text
    assert r.headers["x-drift-backend"] == ok.url
    assert _events(r.text) == ['{"n": 0}', '{"n": 1}', '{"n": 2}', "[DONE]"]
    assert len(bad.requests) == 1
    reason = "first_token_timeout" if mode == "stall-before-first" else "error"
    assert router.metric("drift_router_retries_total", backend=bad.url, reason=reason) == 1
    if mode == "stall-before-first":  # the stalled upstream request was closed (aborted on a real agent)
        wait_until(bad.disconnected.is_set, "the stalled upstream was never closed")


def test_only_stalled_backends_give_a_gateway_timeout_after_bounded_attempts(harness: Harness) -> None:
    a, b = harness.fake(mode="stall-before-first"), harness.fake(mode="stall-before-first")
    router = harness.router([a.url, b.url], first_token_timeout_s=0.3, max_attempts=5)
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}, timeout=20)
    _assert_openai_error(r, 504, "upstream_timeout")
    assert len(a.requests) == len(b.requests) == 1  # each backend once, however many attempts are allowed


def test_only_hanging_backends_give_a_gateway_timeout(harness: Harness) -> None:
    hung = harness.fake(mode="hang")
    router = harness.router([hung.url], first_byte_timeout_s=0.2)
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}, timeout=20)
    _assert_openai_error(r, 504, "upstream_timeout")


def test_a_backend_that_dies_mid_stream_ends_the_clients_stream_with_an_error_event(harness: Harness) -> None:
    dying = harness.fake(mode="die")
    router = harness.router([dying.url])
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}, timeout=20)
    assert r.status_code == 200
    events = _events(r.text)
    assert events[:2] == ['{"n": 0}', '{"n": 1}']  # what was relayed before the cut
    error = json.loads(events[2])["error"]
    assert error["code"] == "upstream_failed" and set(error) == {"message", "type", "param", "code"}
    assert events[3:] == ["[DONE]"]
    assert router.metric("drift_router_stream_errors_total", backend=dying.url, reason="broken") == 1


def test_a_client_disconnect_aborts_the_upstream_request(harness: Harness) -> None:
    endless = harness.fake(mode="endless")
    router = harness.router([endless.url])
    with (
        httpx.Client(timeout=20) as client,
        client.stream("POST", f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}) as r,
    ):
        assert r.status_code == 200
        next(r.iter_raw())
    # The client is gone: the router closes its upstream connection, which the agent sees.
    assert endless.disconnected.wait(20)
    wait_until(lambda: router.state.pool.backends[endless.url].inflight == 0, "request still open")


def test_no_ready_backend_is_a_503_with_retry_after_and_ready_says_so(harness: Harness) -> None:
    down = harness.fake(ready=False)
    router = harness.router([down.url, "http://127.0.0.1:9"], wait_ready=False)
    wait_until(lambda: router.state.pool.backends[down.url].state is not None, "never polled")
    r = httpx.post(f"{router.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    _assert_openai_error(r, 503, "no_ready_backend")
    assert r.headers["Retry-After"] == "1"
    _assert_openai_error(httpx.get(f"{router.url}/ready"), 503, "no_ready_backend")
    assert httpx.get(f"{router.url}/health").status_code == 200
    assert len(down.requests) == 0
    assert router.metric("drift_router_backend_routable", backend=down.url) == 0
    # It recovers: routable again after the next poll.
    down.ready = True
    wait_until(lambda: httpx.get(f"{router.url}/ready").status_code == 200, "never ready")
    assert (
        httpx.post(f"{router.url}/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code
        == 200
    )


def test_a_draining_backend_leaves_the_rotation_until_it_recovers(harness: Harness) -> None:
    a, b = harness.fake(), harness.fake()
    router = harness.router([a.url, b.url], policy="round-robin")
    wait_until(lambda: len(router.state.pool.routable(0.0, None)) == 2, "both routable")
    a.draining = True
    wait_until(lambda: not router.state.pool.backends[a.url].routable(0.0), "draining never seen")
    for _ in range(3):
        assert httpx.post(f"{router.url}/v1/completions", json=COMPLETION).headers["x-drift-backend"] == b.url
    assert router.metric("drift_router_ejections_total", backend=a.url, reason="draining") == 1


def test_bad_input_gets_openai_errors(harness: Harness) -> None:
    ok = harness.fake()
    router = harness.router([ok.url], max_request_body_bytes=1000)
    url = f"{router.url}/v1/completions"
    err = _assert_openai_error(httpx.post(url, json={**COMPLETION, "model": "nope"}), 404, "model_not_found")
    assert err["param"] == "model" and err["type"] == "not_found_error"
    err = _assert_openai_error(httpx.post(url, content=b"{not json"), 400)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    _assert_openai_error(httpx.post(url, content=b"[1, 2]"), 400)
    _assert_openai_error(httpx.post(url, json={"model": 3, "prompt": "x"}), 400)
    _assert_openai_error(httpx.post(url, json={**COMPLETION, "prompt": "x" * 2000}), 413)

    def chunked() -> object:
        yield b'{"prompt": "'
        yield b"x" * 2000
        yield b'"}'

    _assert_openai_error(httpx.post(url, content=chunked()), 413)  # no Content-Length: counted as read
    _assert_openai_error(httpx.get(f"{router.url}/v2/nothing"), 404)
    err = _assert_openai_error(httpx.get(url), 405)
    assert len(ok.requests) == 0  # none of these reached the agent


def test_request_ids_slo_headers_and_other_headers_are_forwarded_but_hop_by_hop_ones_are_not(
    harness: Harness,
) -> None:
    ok = harness.fake()
    router = harness.router([ok.url])
    headers = {
        "x-request-id": "abc123",
        "x-slo-ttft-ms": "250",
        "x-slo-tpot-ms": "40",
        "x-slo-priority": "1",
        "x-session-id": "s1",
        "authorization": "Bearer k",
        "connection": "keep-alive, x-private",
        "x-private": "hop",
        "te": "trailers",
    }
    r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "stream": True}, headers=headers)
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc123"
    seen = {k.lower(): v for k, v in ok.requests[-1]["headers"].items()}
    for name in (
        "x-request-id",
        "x-slo-ttft-ms",
        "x-slo-tpot-ms",
        "x-slo-priority",
        "x-session-id",
        "authorization",
    ):
        assert seen[name] == headers[name]
    assert "x-private" not in seen and "te" not in seen
    assert seen["host"] == ok.url.removeprefix("http://")
    assert ok.requests[-1]["body"] == {**COMPLETION, "stream": True}  # the body as sent


def test_models_lists_the_models_the_agents_serve(harness: Harness) -> None:
    a, b = harness.fake(), harness.fake(model="other")
    router = harness.router([a.url, b.url])
    wait_until(lambda: len(router.state.pool.models()) == 2, "both models known")
    ids = [m["id"] for m in httpx.get(f"{router.url}/v1/models").json()["data"]]
    assert ids == sorted([MODEL, "other"])
    # A request for one model only goes to the backends that serve it.
    for _ in range(3):
        r = httpx.post(f"{router.url}/v1/completions", json={**COMPLETION, "model": "other"})
        assert r.headers["x-drift-backend"] == b.url


def test_models_carries_the_clients_key_and_an_agents_401(harness: Harness) -> None:
    agent = harness.fake(api_key="sk-1")
    router = harness.router([agent.url])
    r = httpx.get(f"{router.url}/v1/models")
    _assert_openai_error(r, 401, "invalid_api_key")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = httpx.get(f"{router.url}/v1/models", headers={"Authorization": "Bearer sk-1"})
    assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 99  # the agent's own card


def fake_discovery(monkeypatch: pytest.MonkeyPatch, first: list[str]) -> dict[str, Any]:
    """Replace the EndpointSlice watch with one that reports `first`; the returned dict records the watch's
    arguments (`calls`) and its `on_change`, to report later lists with."""
    seen: dict[str, Any] = {"calls": []}

    def watch_endpoints(namespace: str, service: str, port: object, on_change: Any, stop: Any) -> None:
        seen["calls"].append((namespace, service, port))
        seen["on_change"] = on_change
        on_change(first)
        stop.wait()

    fake = types.ModuleType("drift_agent.router.discovery")
    fake.watch_endpoints = watch_endpoints  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "drift_agent.router.discovery", fake)
    monkeypatch.setattr(drift_agent.router, "discovery", fake, raising=False)
    return seen


def test_discovery_adds_and_removes_backends_live(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = harness.fake(), harness.fake()
    seen = fake_discovery(monkeypatch, [a.url])
    calls = seen["calls"]
    router = harness.router([], discover="ns/agents", discover_port="http")
    assert calls == [("ns", "agents", "http")]
    assert list(router.state.pool.backends) == [a.url]
    seen["on_change"]([b.url])
    wait_until(lambda: list(router.state.pool.backends) == [b.url], "backend list not followed")
    wait_until(lambda: httpx.get(f"{router.url}/ready").status_code == 200, "new backend never ready")
    assert httpx.post(f"{router.url}/v1/completions", json=COMPLETION).headers["x-drift-backend"] == b.url
    assert router.metric("drift_router_ejections_total", backend=a.url, reason="removed") == 1


def test_static_backends_stay_next_to_discovered_ones(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--backend` with `--discover`: discovery's lists (even an empty one) never drop the static backend."""
    static, found = harness.fake(), harness.fake()
    holder = fake_discovery(monkeypatch, [found.url])
    router = harness.router([static.url], discover="ns/agents", policy="round-robin")
    wait_until(lambda: set(router.state.pool.backends) == {static.url, found.url}, "discovery not merged")
    wait_until(lambda: len(httpx.get(f"{router.url}/ready").json().get("backends", [])) == 2, "not polled")
    used = {
        httpx.post(f"{router.url}/v1/completions", json=COMPLETION).headers["x-drift-backend"] for _ in "ab"
    }
    assert used == {static.url, found.url}
    holder["on_change"]([])
    wait_until(lambda: list(router.state.pool.backends) == [static.url], "discovered backend not removed")
    assert (
        httpx.post(f"{router.url}/v1/completions", json=COMPLETION).headers["x-drift-backend"] == static.url
    )


def test_a_conversation_keeps_its_home_while_the_home_refuses(harness: Harness) -> None:
    """prefix-affinity: the home's 429 sends the turn elsewhere, but the conversation goes back home once the
    home takes requests again (its prefix cache is there); it is not moved for good."""
    home, other = harness.fake(retry_after="1"), harness.fake()
    router = harness.router([home.url, other.url], policy="prefix-affinity")
    turn = {**COMPLETION, "user": "conversation-1"}

    def send() -> str:
        r = httpx.post(f"{router.url}/v1/completions", json=turn, timeout=20)
        assert r.status_code == 200, r.text
        return r.headers["x-drift-backend"]

    assert send() == home.url  # a new key: the least loaded (a tie: the lowest id)
    home.mode = "refuse"
    assert send() == other.url  # refused by the home, retried on the other
    assert send() == other.url  # the home is in its Retry-After window: a stand-in serves
    assert router.metric("drift_router_decisions_total", policy="prefix-affinity", reason="home_away") == 1
    assert len(home.requests) == 2
    home.mode = "ok"
    wait_until(lambda: router.state.pool.backends[home.url].routable(time.monotonic()), "home never back")
    assert send() == home.url  # back home: sticky again
    assert router.metric("drift_router_decisions_total", policy="prefix-affinity", reason="sticky") >= 1

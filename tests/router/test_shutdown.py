"""A real `drift router` process on SIGTERM: /ready turns 503 at once while requests, open and new, are still
served for the drain period; then it stops. The agent is a fake (the router's behaviour is the subject)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.router.conftest import MODEL, Harness, spawn, wait_ready, wait_until

COMPLETION = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}
DRAIN_S = 6.0


def test_sigterm_drains_ready_503_while_serving_then_exits(harness: Harness, tmp_path: Path) -> None:
    agent = harness.fake(interval=0.5)  # a stream of 3 events over ~1.5 s: open across the signal
    router = spawn(
        ["router", "--backend", agent.url, "--poll-interval-ms", "20", "--drain-seconds", str(DRAIN_S)],
        tmp_path / "router.log",
    )
    try:
        wait_ready(router, timeout=30)
        streamed: list[httpx.Response] = []

        def stream() -> None:
            body = {**COMPLETION, "stream": True}
            streamed.append(httpx.post(f"{router.url}/v1/completions", json=body, timeout=30))

        opened = len(agent.requests)
        t = threading.Thread(target=stream)
        t.start()
        wait_until(lambda: len(agent.requests) > opened, "the stream never reached the agent")
        signalled = time.monotonic()
        router.proc.send_signal(signal.SIGTERM)
        # /ready says 503 at once (endpoints controllers take the pod out) ...
        wait_until(lambda: httpx.get(f"{router.url}/ready", timeout=5).status_code == 503, "never 503")
        r = httpx.get(f"{router.url}/ready", timeout=5)
        assert r.json()["error"]["code"] == "draining"
        # ... while new requests are still served, and the open stream completes.
        r = httpx.post(f"{router.url}/v1/completions", json=COMPLETION, timeout=10)
        assert r.status_code == 200, r.text
        t.join(30)
        assert streamed and streamed[0].status_code == 200
        assert streamed[0].text.rstrip().endswith("data: [DONE]")
        assert router.proc.wait(DRAIN_S + 30) == 0, router.log.read_text()
        assert time.monotonic() - signalled >= DRAIN_S  # served (not closed) for the whole drain
    finally:
        router.stop()


def test_a_second_signal_ends_the_drain_at_once(harness: Harness, tmp_path: Path) -> None:
    agent = harness.fake()
    router = spawn(["router", "--backend", agent.url, "--drain-seconds", "600"], tmp_path / "router.log")
    try:
        wait_ready(router, timeout=30)
        router.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{router.url}/ready", timeout=5).status_code == 503, "never 503")
        router.proc.send_signal(signal.SIGTERM)
        assert router.proc.wait(30) == 0, router.log.read_text()
    finally:
        router.stop()

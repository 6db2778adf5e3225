"""Graceful shutdown: stop accepting, let running requests finish up to the deadline, abort the rest, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from drift_agent.server.settings import ServerSettings
from tests.server.conftest import LiveServer, start_server, wait_idle
from tests.tiny_models import tiny_model_dir

LONG = {"prompt": "Hi", "max_tokens": 450, "ignore_eos": True}


class StreamReader(threading.Thread):
    """Reads one SSE completion stream in the background; `first` is set once the first chunk arrived."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first = threading.Event()
        self.chunks: list[dict] = []
        self.done = False

    def run(self) -> None:
        with httpx.stream(
            "POST", f"{self.url}/v1/completions", json={**self.body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self.chunks.append(json.loads(line[6:]))
                    self.first.set()

    @property
    def finish_reason(self) -> str | None:
        return next(
            (c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"][0]["finish_reason"]), None
        )


def test_drain_lets_running_requests_finish(async_engine) -> None:
    live = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, shutdown_timeout_s=30))
    reader = StreamReader(live.url, LONG)
    reader.start()
    assert reader.first.wait(10)
    live.server.should_exit = True  # what SIGTERM does
    # While draining the socket still answers: not ready, and new work is refused with 503 + Retry-After.
    deadline = time.monotonic() + 5
    while httpx.get(f"{live.url}/ready").status_code != 503:
        assert time.monotonic() < deadline, "server never reported draining"
        time.sleep(0.02)
    refused = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "draining"
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert reader.is_alive(), "the long request should still be running during the checks"
    reader.join(30)
    live.thread.join(30)
    assert not live.thread.is_alive()
    assert reader.done and reader.finish_reason == "length"
    assert sum(c["choices"][0]["text"] != "" for c in reader.chunks) > 1


def test_drain_deadline_aborts_the_rest(async_engine, tiny_engine) -> None:
    live = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, shutdown_timeout_s=0.2))
    reader = StreamReader(live.url, LONG)
    reader.start()
    result: dict = {}
    blocking = threading.Thread(
        target=lambda: result.update(httpx.post(f"{live.url}/v1/completions", json=LONG, timeout=60).json()),
        daemon=True,
    )
    blocking.start()
    assert reader.first.wait(10)
    # Both requests must be in the engine before SIGTERM (a fixed sleep let a loaded machine drain first).
    deadline = time.monotonic() + 10
    while len(tiny_engine.requests) < 2:
        assert time.monotonic() < deadline, "the blocking request never reached the engine"
        time.sleep(0.01)
    live.server.should_exit = True
    reader.join(30)
    blocking.join(30)
    live.thread.join(30)
    assert not live.thread.is_alive()
    # Both got a proper end: a final "abort" chunk and [DONE]; a 200 with the partial text.
    assert reader.done and reader.finish_reason == "abort"
    assert result["choices"][0]["finish_reason"] == "abort"
    assert result["usage"]["completion_tokens"] < LONG["max_tokens"]
    deadline = time.monotonic() + 5
    while tiny_engine.requests or async_engine.stats().kv_usage > 0:
        assert time.monotonic() < deadline, "aborted requests kept their KV blocks"
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch and loads the model: several seconds on 2 cores
def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "drift_agent.cli",
        "serve",
        "--model",
        str(tiny_model_dir("llama")),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-kv-blocks",
        "64",
        "--max-num-seqs",
        "4",
        "--num-threads",
        "1",
        "--shutdown-timeout-s",
        "30",
        "--no-access-log",
    ]
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "drift serve did not become ready"
            time.sleep(0.2)
        reader = StreamReader(url, LONG)
        reader.start()
        assert reader.first.wait(10)
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
        assert reader.done and reader.finish_reason == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_shared_server_still_idle(live: LiveServer) -> None:
    """The drain tests used the shared engine; it must have nothing left over."""
    m = wait_idle(live)
    assert m[("vllm:kv_cache_usage_perc", frozenset({("model_name", "tiny-llama")}))] == 0

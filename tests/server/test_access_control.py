"""Who may do what: client priorities, the admin API on its own port, admin changes that time out, and the
shutdown time a pod must be granted."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server.app import build_app
from drift_agent.server.settings import DRAIN_FLUSH_S, UVICORN_GRACEFUL_S, ServerSettings
from drift_agent.server.uvicorn_server import DrainingServer

from .conftest import MODEL, start_server

BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize("how", ["header", "body"])
def test_client_priority_ahead_of_the_queue_needs_the_servers_consent(
    async_engine: AsyncLLMEngine, how: str
) -> None:
    def request(live: Any, priority: int) -> httpx.Response:
        with live.client() as http:
            if how == "header":
                return http.post("/v1/completions", json=BODY, headers={"x-slo-priority": str(priority)})
            return http.post("/v1/completions", json={**BODY, "priority": priority})

    closed = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0))
    try:
        refused = request(closed, -1)
        assert refused.status_code == 403
        assert refused.json()["error"]["param"] == "priority"
        assert "--allow-client-priority" in refused.json()["error"]["message"]
        assert request(closed, 3).status_code == 200  # yielding to others is always allowed
        assert request(closed, 0).status_code == 200
    finally:
        closed.stop()
    opened = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, allow_client_priority=True))
    try:
        assert request(opened, -1).status_code == 200
    finally:
        opened.stop()


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def two_ports(async_engine: AsyncLLMEngine) -> Iterator[tuple[str, str]]:
    """One server on an API socket and an admin socket, as `drift serve --admin-port` runs it."""
    api, admin = _free_socket(), _free_socket()
    settings = ServerSettings(
        host="127.0.0.1", port=api.getsockname()[1], admin_port=admin.getsockname()[1], admin_token="t" * 16
    )
    app = build_app(async_engine, settings, gpu_metrics=False)
    server = DrainingServer(
        uvicorn.Config(app, log_level="warning", lifespan="on"), app.state.drift.inflight, 1.0
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [api, admin]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{api.getsockname()[1]}", f"http://127.0.0.1:{admin.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_admin_port_serves_the_admin_api_and_nothing_else(two_ports: tuple[str, str]) -> None:
    api, admin = two_ports
    auth = {"Authorization": "Bearer " + "t" * 16}
    assert httpx.get(f"{api}/admin/policy").status_code == 404
    assert httpx.put(f"{api}/admin/policy", json={}, headers=auth).status_code == 404
    assert httpx.get(f"{admin}/admin/policy").status_code == 200
    assert httpx.put(f"{admin}/admin/policy", json={"slo": {"ttft_ms": 900}}, headers=auth).status_code == 200
    for path in ("/v1/models", "/health", "/metrics"):
        assert httpx.get(f"{api}{path}").status_code == 200
        assert httpx.get(f"{admin}{path}").status_code == 404
    httpx.put(f"{admin}/admin/policy", json={"slo": {"ttft_ms": 1000}}, headers=auth)


def test_an_admin_change_that_times_out_is_not_applied_later(async_engine: AsyncLLMEngine) -> None:
    """The engine thread is held up past the admin timeout: the change is reported as not applied, and it
    must not take effect when the engine gets to it afterwards."""
    settings = ServerSettings(host="127.0.0.1", port=0, admin_token="t" * 16, admin_timeout_s=0.3)
    live = start_server(async_engine, settings)
    release = threading.Event()
    try:
        before = async_engine.engine.config.slo_ttft_ms
        async_engine.call_in_engine_thread(lambda _: release.wait(5))  # the engine is busy for a while
        with live.client() as http:
            response = http.put(
                "/admin/policy",
                json={"slo": {"ttft_ms": before + 123}},
                headers={"Authorization": "Bearer " + "t" * 16},
            )
            assert response.status_code == 503
            assert "nothing was applied" in response.json()["error"]["message"]
            release.set()
            drained = threading.Event()  # queued after the withdrawn change: set once the engine ran past it
            async_engine.call_in_engine_thread(lambda _: drained.set())
            assert drained.wait(10)
            assert http.get("/admin/policy").json()["slo"]["ttft_ms"] == before
    finally:
        release.set()
        live.stop()


def test_worst_case_shutdown_covers_drain_flush_and_uvicorn() -> None:
    settings = ServerSettings(shutdown_timeout_s=20)
    assert settings.worst_case_shutdown_s == 20 + DRAIN_FLUSH_S + UVICORN_GRACEFUL_S

"""Fair scheduling through the server: the client id from the x-client-id header (or the API key's index,
never the key), carried into the engine's fair scheduler and the per-client served-tokens metric."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.server.metrics import MAX_CLIENT_LABELS, ServerMetrics
from drift_agent.server.sampling import MAX_CLIENT_ID_LEN, client_id
from drift_agent.server.settings import ServerSettings

from .conftest import MODEL, LiveServer, start_server, tiny_engine_config, wait_idle

SERVED = "drift_client_served_tokens_total"
KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def fair_engine() -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(fairness="vtc")))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def fair(fair_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    server = start_server(fair_engine)
    yield server
    server.stop()


def _complete(live: LiveServer, headers: dict[str, str]) -> int:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{live.base_url}/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"]


def test_two_clients_by_header_are_counted_apart(fair: LiveServer) -> None:
    served = {"alice": 0, "bob": 0}
    for client, n in (("alice", 3), ("bob", 1)):
        for _ in range(n):
            served[client] += _complete(fair, {"x-client-id": client})
    wait_idle(fair)
    for client, tokens in served.items():
        assert fair.metric(SERVED, client=client) == tokens
    vtc = fair.async_engine.engine.scheduler.vtc
    assert vtc is not None and vtc.served["alice"] == served["alice"] and vtc.served["bob"] == served["bob"]
    # Unnamed requests are the anonymous client.
    tokens = _complete(fair, {})
    wait_idle(fair)
    assert fair.metric(SERVED, client="anonymous") == tokens


def test_with_api_keys_the_client_is_the_keys_index(fair_engine: AsyncLLMEngine) -> None:
    server = start_server(fair_engine, ServerSettings(host="127.0.0.1", port=0, api_keys=KEYS))
    try:
        # The header cannot pose as another client once keys identify them.
        tokens = _complete(server, {"authorization": "Bearer second-key", "x-client-id": "alice"})
        wait_idle(server)
        assert server.metric(SERVED, client="key-1") == tokens
        assert "second-key" not in httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()


def test_client_id_and_the_label_bound(fair: LiveServer) -> None:
    assert client_id({"x-client-id": " team-a "}) == "team-a"
    assert client_id({"x-client-id": "x" * 1000}) == "x" * MAX_CLIENT_ID_LEN
    assert client_id({"x-client-id": "alice"}, api_key_index=0) == "key-0"
    assert client_id({}) == ""
    m = ServerMetrics(fair.async_engine, MODEL, 60.0, gpu=False)
    for i in range(MAX_CLIENT_LABELS + 50):
        m._client_counter(f"c{i}").inc()
    text = m.render().decode()
    assert text.count(f"{SERVED}{{") == MAX_CLIENT_LABELS + 1  # the first ones, then "other"
    assert f'{SERVED}{{client="other"}} 50.0' in text
    assert len(m._client_labels) == MAX_CLIENT_LABELS

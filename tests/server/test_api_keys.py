"""`--api-key` / DRIFT_API_KEY: the OpenAI routes need a bearer key (401 in OpenAI's shape); probes, metrics
and /state stay open. Checked with the official openai client against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server.auth import bearer_token, is_protected, key_index
from drift_agent.server.settings import ServerSettings

from .conftest import MODEL, LiveServer, start_server

KEYS = ("first-key", "second-key")


@pytest.fixture(scope="module")
def secured(async_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    server = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, api_keys=KEYS))
    yield server
    server.stop()


def _client(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_is_accepted(secured: LiveServer, key: str) -> None:
    client = _client(secured, key)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="hello", max_tokens=2, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 2
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
    )
    assert any(chunk.choices for chunk in chat)


def test_a_wrong_key_is_refused_in_openais_shape(secured: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(secured, "not-a-key").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.status_code == 401
    error = info.value.response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert "not-a-key" not in error["message"]  # the presented key is never echoed


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "first-key"},
        {"Authorization": "Basic first-key"},
        {"Authorization": "Bearer  x"},
    ],
)
@pytest.mark.parametrize(
    "method,path",
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")],
)
def test_protected_routes_need_a_bearer_key(
    secured: LiveServer, method: str, path: str, headers: dict[str, str]
) -> None:
    resp = httpx.request(method, secured.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_the_scheme_is_case_insensitive_and_tokenize_works_with_a_key(secured: LiveServer) -> None:
    resp = httpx.post(
        secured.url + "/tokenize", headers={"Authorization": "bearer second-key"}, json={"prompt": "hi"}
    )
    assert resp.status_code == 200 and resp.json()["count"] >= 1


@pytest.mark.parametrize(
    "path", ["/health", "/ready", "/ping", "/version", "/metrics", "/state", "/openapi.json"]
)
def test_probes_metrics_and_state_stay_open(secured: LiveServer, path: str) -> None:
    assert httpx.get(secured.url + path, timeout=10).status_code == 200


def test_admin_keeps_its_own_token(secured: LiveServer) -> None:
    # An API key is no admin token: /admin/* is governed by DRIFT_ADMIN_TOKEN alone (none here: 403).
    resp = httpx.put(secured.url + "/admin/policy", headers={"Authorization": "Bearer first-key"}, json={})
    assert resp.status_code == 403
    assert httpx.get(secured.url + "/admin/policy").status_code == 200


def test_openapi_documents_the_key(secured: LiveServer) -> None:
    doc = httpx.get(secured.url + "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    assert "401" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]


def test_without_keys_every_route_is_open(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.base_url, api_key="anything", max_retries=0)
    assert client.models.list().data[0].id == MODEL
    assert httpx.get(live.url + "/v1/models").status_code == 200  # no Authorization header at all


def test_keys_from_flags_and_environment() -> None:
    env = {"DRIFT_API_KEY": "a, b"}
    assert ServerSettings.from_sources(env).api_key_values() == ("a", "b")
    # Flags win over the environment; each flag may itself be comma-separated.
    assert ServerSettings.from_sources(env, api_keys=["x", "y,z"]).api_key_values() == ("x", "y", "z")
    assert ServerSettings.from_sources({}).api_keys is None
    with pytest.raises(ValueError, match="empty"):
        ServerSettings(api_keys="a,,b")
    assert "secret-a" not in repr(ServerSettings(api_keys="secret-a"))  # SecretStr: never in logs or reprs


def test_matching_helpers() -> None:
    assert bearer_token(b"Bearer  k ") == b"k" and bearer_token(b"Token k") is None
    assert key_index(b"k2", [b"k1", b"k2"]) == 1 and key_index(b"k", [b"k1", b"k2"]) is None
    assert is_protected("/v1/models") and is_protected("/tokenize") and not is_protected("/state")
    assert not is_protected("/v10") and not is_protected("/metrics")


@pytest.mark.parametrize(
    ("argv", "env", "keys"),
    [
        (["--api-key", "K1", "K2"], {}, ("K1", "K2")),  # vLLM's spelling
        (["--api-key", "K1", "K2", "--port", "9"], {}, ("K1", "K2")),
        (["--api-key", "a", "--api-key", "b,c"], {}, ("a", "b", "c")),
        (["--api-key", "a", "b", "--api-key", "c"], {"DRIFT_API_KEY": "env"}, ("a", "b", "c")),
        ([], {"DRIFT_API_KEY": "e1,e2"}, ("e1", "e2")),
        ([], {}, ()),
    ],
)
def test_api_key_flag_spellings(argv: list[str], env: dict[str, str], keys: tuple[str, ...]) -> None:
    from drift_agent.cli import build_parser
    from drift_agent.server.cli import server_settings

    args = build_parser().parse_args(["serve", *argv])
    assert server_settings(args, env).api_key_values() == keys

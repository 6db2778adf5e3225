"""Hostile and malformed input: bounded bodies, an event loop that never waits on one request, no client code
(chat templates), a 4xx naming the field for every bad value, and an OpenAPI document that tells the truth."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from drift_agent.core.errors import InvalidRequestError
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server import serving
from drift_agent.server.chat_template import load_chat_template
from drift_agent.server.settings import ServerSettings
from tests.server.conftest import MODEL, LiveServer, start_server, wait_idle
from tests.server.test_errors import assert_openai_error

HEALTH_BUDGET_S = 0.1
SERVER_TEMPLATE = "{% for m in messages %}SERVER[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
CLIENT_TEMPLATE = "{% for m in messages %}CLIENT {{ m['content'] }}{% endfor %}"
ADMIN_TOKEN = "hardening-token"
USER = [{"role": "user", "content": "Hello"}]


class HealthProbe:
    """Polls /health from its own thread and connection, like a kubelet, and records every latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            http.get("/health")  # connect first: only the answer time is measured
            while not self._stop.is_set():
                start = time.perf_counter()
                r = http.get("/health")
                self.latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    self.failures.append(r.text)
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def assert_responsive(self, min_probes: int = 5) -> None:
        assert not self.failures, self.failures
        assert len(self.latencies) >= min_probes, f"only {len(self.latencies)} probes answered"
        worst = max(self.latencies)
        assert worst < HEALTH_BUDGET_S, (
            f"/health took {worst * 1e3:.0f} ms (budget {HEALTH_BUDGET_S * 1e3:.0f})"
        )


@pytest.fixture(scope="module")
def custom_live(async_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    """A server with its own template, request templates trusted, a small body limit and an admin token."""
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        chat_template=SERVER_TEMPLATE,
        trust_request_chat_template=True,
        max_request_body_bytes=64 * 1024,
        admin_token=ADMIN_TOKEN,
    )
    live = start_server(async_engine, settings)
    yield live
    live.stop()


def _post_raw(http: httpx.Client, path: str, raw: str | bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"content-type": "application/json"})


# ---- bounded bodies; the event loop never waits on one request --------------------------------------------
def test_huge_body_is_413_at_once_while_health_answers(live: LiveServer) -> None:
    body = b'{"prompt": "' + b"a" * 10_000_000 + b'", "max_tokens": 1}'
    with HealthProbe(live.url) as probe, live.client() as http:
        time.sleep(0.1)
        for content in (body, iter([body[i : i + 65536] for i in range(0, len(body), 65536)])):
            start = time.perf_counter()  # with Content-Length, then chunked (counted as it is read)
            r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert time.perf_counter() - start < 1.0
            err = assert_openai_error(r, 413, contains="larger than 4194304 bytes")
            assert err["type"] == "invalid_request_error"
        time.sleep(0.1)
    probe.assert_responsive()


def test_large_body_is_decoded_off_the_event_loop(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded_on: list[str] = []

    def spy(body: bytes) -> Any:
        decoded_on.append(threading.current_thread().name)
        return decode(body)

    decode = serving._decode_json
    monkeypatch.setattr(serving, "_decode_json", spy)
    # Just under the 4 MiB limit, two million numbers: json.loads alone takes a few tenths of a second.
    numbers = b"0," * ((4 * 1024 * 1024 - 100) // 2 - 1) + b"0"
    body = b'{"prompt": "Hello", "max_tokens": 2, "padding": [' + numbers + b"]}"
    assert len(body) <= 4 * 1024 * 1024
    with live.client() as http:
        assert _post_raw(http, "/v1/completions", body).status_code == 200
        # The same body cut short gets the error a small malformed body gets.
        r = _post_raw(http, "/v1/completions", body[:-1])
        assert_openai_error(r, 400, contains="request body is not valid JSON: Expecting ',' delimiter")
        small = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
        assert _post_raw(http, "/v1/completions", small).status_code == 200
        assert_openai_error(_post_raw(http, "/v1/completions", small[:-1]), 400, contains="not valid JSON")
    assert len(decoded_on) == 2 and all(n.startswith("drift-tokenizer") for n in decoded_on), decoded_on


def test_chunked_body_past_the_limit_is_413(custom_live: LiveServer) -> None:
    def trickle() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"b" * 8192
        yield b'"}'

    with custom_live.client() as http:
        r = http.post("/v1/completions", content=trickle(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413, contains="65536 bytes")
        small = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
        r = http.post("/v1/completions", content=iter([small]), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def _http_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, rest


def test_slow_body_does_not_block_health(live: LiveServer) -> None:
    body = json.dumps({"prompt": "Hello " + " " * 200, "max_tokens": 2}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with HealthProbe(live.url) as probe, socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        for i in range(0, len(body), 16):  # ~1.5 s of trickling
            sock.sendall(body[i : i + 16])
            time.sleep(0.1)
        status, payload = _http_response(sock)
    assert status == 200, payload
    assert json.loads(payload)["usage"]["completion_tokens"] == 2
    probe.assert_responsive(min_probes=20)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_long_prompt_is_tokenized_off_the_event_loop(live: LiveServer, route: str) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 12_000  # ~0.5 MB: about a second to tokenize
    body: dict[str, Any] = {"max_tokens": 2}
    body |= (
        {"prompt": text} if route == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    )
    with HealthProbe(live.url) as probe, live.client() as http:
        time.sleep(0.1)
        r = http.post(route, json=body)
        time.sleep(0.1)
    err = assert_openai_error(r, 400, code="context_length_exceeded")
    assert err["param"] == ("prompt" if route == "/v1/completions" else "messages")
    probe.assert_responsive()


# ---- no code from clients -----------------------------------------------------------------------------------
def test_request_chat_template_refused_by_default(live: LiveServer) -> None:
    with live.client() as http:
        for extra, param in [
            ({"chat_template": CLIENT_TEMPLATE}, "chat_template"),
            ({"chat_template_kwargs": {"chat_template": CLIENT_TEMPLATE}}, "chat_template_kwargs"),
        ]:
            r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
            err = assert_openai_error(r, 400, contains="--trust-request-chat-template")
            assert err["param"] == param
            r = http.post("/tokenize", json={"messages": USER, **extra})
            assert assert_openai_error(r, 400)["param"] == param
        # Template variables without a template stay allowed; the server's own parameters do not.
        assert (
            http.post(
                "/v1/chat/completions",
                json={"messages": USER, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": False}},
            ).status_code
            == 200
        )
        r = http.post("/tokenize", json={"messages": USER, "chat_template_kwargs": {"tokenize": True}})
        assert assert_openai_error(r, 400, contains="tokenize")["param"] == "chat_template_kwargs"


def test_server_template_and_trusted_request_template(custom_live: LiveServer, tiny_engine) -> None:
    tok = tiny_engine.tokenizer

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False).input_ids)

    with custom_live.client() as http:
        r = http.post("/tokenize", json={"messages": USER})
        assert r.json()["tokens"] == ids("SERVER[user] Hello\n")
        for extra in (
            {"chat_template": CLIENT_TEMPLATE},
            {"chat_template_kwargs": {"chat_template": CLIENT_TEMPLATE}},
        ):
            r = http.post("/tokenize", json={"messages": USER, **extra})
            assert r.status_code == 200 and r.json()["tokens"] == ids("CLIENT Hello")
            r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids("CLIENT Hello"))
        r = http.post("/tokenize", json={"messages": USER, "chat_template": "{% for %}"})
        assert assert_openai_error(r, 400, contains="chat template failed")["param"] == "messages"


def test_load_chat_template(tmp_path: Path) -> None:
    file = tmp_path / "t.jinja"
    file.write_text(SERVER_TEMPLATE)
    assert load_chat_template(str(file)) == SERVER_TEMPLATE
    assert load_chat_template(CLIENT_TEMPLATE) == CLIENT_TEMPLATE  # inline, as vLLM accepts it
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="invalid Jinja"):
        load_chat_template("{% for m in messages %}")


def test_body_limit_setting_sources() -> None:
    assert ServerSettings().max_request_body_bytes == 4 * 1024 * 1024
    env = {"DRIFT_MAX_REQUEST_BODY_BYTES": "1024"}
    assert ServerSettings.from_sources(env).max_request_body_bytes == 1024
    assert ServerSettings.from_sources(env, max_request_body_bytes=2048).max_request_body_bytes == 2048
    with pytest.raises(ValueError):
        ServerSettings.from_sources({"DRIFT_MAX_REQUEST_BODY_BYTES": "0"})


# ---- a 4xx naming the field for every malformed input -------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        # Lone surrogates: valid JSON, but text no tokenizer (or JSON response) can take.
        ("/v1/completions", r'{"prompt": "a\ud800b", "max_tokens": 2}', "prompt"),
        ("/v1/completions", r'{"prompt": ["ok", "\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages"),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
            "messages",
        ),
        ("/v1/completions", r'{"prompt": "x", "stop": ["\ud800"]}', "stop"),
        ("/v1/completions", r'{"prompt": "x", "model": "\ud800"}', "model"),
        ("/tokenize", r'{"prompt": "\ud800"}', "prompt"),
        # Values vLLM refuses.
        ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', "messages"),
        ("/v1/completions", '{"prompt": "x", "stream": "yes"}', "stream"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stream": 1}', "stream"),
        ("/v1/completions", '{"prompt": [5, 99999], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": [[5], [-1]], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "x", "n": 2, "best_of": 1}', "best_of"),
        ("/v1/completions", '{"prompt": "x", "n": 1, "best_of": 3}', "best_of"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "messages",
        ),
        ("/v1/completions", '{"prompt": "x", "request_id": "two words"}', "request_id"),
        # Range errors the engine finds still name the field.
        ("/v1/completions", '{"prompt": "x", "top_p": 0}', "top_p"),
        ("/v1/completions", '{"prompt": "x", "temperature": -1}', "temperature"),
        ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
        ("/v1/completions", '{"prompt": "x", "max_tokens": 3, "min_tokens": 5}', "min_tokens"),
        ("/v1/completions", '{"prompt": "x", "stop": [""]}', "stop"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}',
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50}',
            "top_logprobs",
        ),
        # Seeds: torch takes [-2**63, 2**64 - 1], and choice i samples with seed + i.
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 1, "seed": 18446744073709551616}', "seed"),
        (
            "/v1/completions",
            '{"prompt": "hi", "max_tokens": 3, "n": 2, "seed": 18446744073709551615}',
            "seed",
        ),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 1, "seed": -9223372036854775809}', "seed"),
    ],
)
def test_malformed_values_are_400_naming_the_field(live: LiveServer, path: str, raw: str, param: str) -> None:
    with live.client() as http:
        err = assert_openai_error(_post_raw(http, path, raw), 400)
    assert err["param"] == param, err


def test_edge_values_that_are_valid_are_served(live: LiveServer) -> None:
    base = {"prompt": "hi", "max_tokens": 2, "temperature": 1.0}
    with live.client() as http:
        for extra in (
            {"seed": 2**64 - 1},
            {"seed": -(2**63)},
            {"seed": 2**64 - 2, "n": 2},
            {"n": 2, "best_of": 2},
        ):
            r = http.post("/v1/completions", json=base | extra)
            assert r.status_code == 200, (extra, r.text)
            assert len(r.json()["choices"]) == extra.get("n", 1)
        msgs = [
            {"role": role, "content": "x"} for role in ("developer", "system", "user", "assistant", "tool")
        ]
        assert http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).status_code == 200


def test_context_length_errors_name_the_prompt_field(live: LiveServer) -> None:
    with live.client() as http:
        r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 10_000})
        assert assert_openai_error(r, 400, code="context_length_exceeded")["param"] == "messages"
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 10_000})
        assert assert_openai_error(r, 400, code="context_length_exceeded")["param"] == "prompt"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_admin_refuses_non_finite_slo(custom_live: LiveServer, value: str) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    with custom_live.client() as http:
        before = http.get("/admin/policy").json()
        for raw in (
            f'{{"slo": {{"ttft_ms": {value}}}}}',
            f'{{"slo": {{"tpot_ms": {value}}}}}',
            f'{{"partition": {{"prefill_sm_share": {value}}}}}',
        ):
            r = http.put("/admin/policy", content=raw, headers=auth)
            assert_openai_error(r, 422)
        assert http.get("/admin/policy").json() == before


# ---- an engine failure of one request is a clean error, never a hang -------------------------------------------
class _FaultyEngine:
    """The real engine, except that every request goes wrong after its first output: it fails with `fault`
    (an exception), its stream just ends (None), or it yields `fault`, an output the server cannot read."""

    def __init__(self, real: AsyncLLMEngine, fault: object) -> None:
        self._real = real
        self.fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return self._go_wrong(await self._real.generate(*args, **kwargs))

    async def _go_wrong(self, stream: Any) -> AsyncIterator[Any]:
        async for out in stream:
            yield out
            break
        await stream.aclose()  # frees the engine request
        if isinstance(self.fault, Exception):
            raise self.fault
        if self.fault is not None:
            yield self.fault


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (RuntimeError("simulated GPU fault"), 500, "simulated GPU fault"),
        (InvalidRequestError("bad input"), 400, "bad input"),
        (None, 500, "ended without a final output"),
        (SimpleNamespace(finished=False), 500, "internal error"),  # the server's own code fails on it
    ],
)
def test_per_request_engine_failure_is_an_error_response(
    async_engine: AsyncLLMEngine, fault: object, status: int, message: str
) -> None:
    live = start_server(_FaultyEngine(async_engine, fault))  # type: ignore[arg-type]
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 50, "ignore_eos": True, "n": 2}
    try:
        with httpx.Client(base_url=live.url, timeout=10) as http:  # a hang fails, it does not stall the suite
            assert_openai_error(http.post("/v1/completions", json=body), status, contains=message)
            for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"messages": USER})):
                with http.stream("POST", path, json={**body, **extra, "stream": True}) as r:
                    assert r.status_code == 200
                    events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
                assert events[-1] == "[DONE]"
                assert message in json.loads(events[-2])["error"]["message"]
        # Nothing of those requests is left in the engine.
        m, lab = wait_idle(live), frozenset({("model_name", MODEL)})
        assert m[("vllm:num_requests_running", lab)] == 0 and m[("vllm:kv_cache_usage_perc", lab)] == 0
    finally:
        live.stop()


# ---- OpenAPI that matches behaviour ------------------------------------------------------------------------------
def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_documents_real_statuses(live: LiveServer) -> None:
    with live.client() as http:
        doc = http.get("/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    error_ref = "#/components/schemas/ErrorResponse"
    expected = {
        ("/v1/completions", "post"): {"200", "400", "401", "403", "404", "413", "429", "500", "503"},
        ("/v1/chat/completions", "post"): {"200", "400", "401", "403", "404", "413", "429", "500", "503"},
        ("/tokenize", "post"): {"200", "400", "404", "413"},
        ("/detokenize", "post"): {"200", "400", "404", "413"},
        ("/admin/policy", "put"): {"200", "401", "403", "413", "422", "503"},
        ("/ready", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses, (path, set(responses))
        for status in statuses - {"200"}:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert set(paths[path]["post"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # The admin PUT: its body is PolicyUpdate, behind the bearer scheme.
    put = paths["/admin/policy"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"]["title"] == "PolicyUpdate"
    (scheme,) = put["security"][0]
    assert doc["components"]["securitySchemes"][scheme] | {"description": None} == {
        "type": "http",
        "scheme": "bearer",
        "description": None,
    }
    assert "security" not in paths["/admin/policy"]["get"]
    assert "HTTPValidationError" not in schemas
    missing = {ref for ref in _refs(doc) if ref.removeprefix("#/components/schemas/") not in schemas}
    assert not missing, missing
    seed = schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    # FastAPI's OpenAPI model holds bounds as floats: 2**64 - 1 shows as its nearest double.
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), float(2**64 - 1))


def test_405_lists_every_allowed_method(live: LiveServer) -> None:
    with live.client() as http:
        r = http.delete("/admin/policy")
        assert_openai_error(r, 405)
        assert r.headers["allow"] == "GET, PUT"
        r = http.get("/v1/chat/completions")
        assert_openai_error(r, 405)
        assert r.headers["allow"] == "POST"


async def test_health_answers_during_concurrent_big_requests(live: LiveServer) -> None:
    """Several large requests at once (each under the body limit) still leave the loop free."""
    text = "Numbers like 1024, 2048 and 3.14159 appear in text too. " * 6000
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
        with HealthProbe(live.url) as probe:
            responses = await asyncio.gather(
                *(http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}) for _ in range(3)),
                http.post("/tokenize", json={"prompt": text[:20_000]}),
            )
    assert [r.status_code for r in responses] == [400, 400, 400, 200]
    probe.assert_responsive()

"""Bad input gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer


def assert_openai_error(resp, status: int, *, code: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and isinstance(body["error"]["type"], str)
    if code is not None:
        assert body["error"]["code"] == code
    assert contains in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("path", "raw", "contains"),
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": [', "not valid JSON"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
        ("/v1/completions", json.dumps({"max_tokens": 3}).encode(), "prompt"),
        ("/v1/chat/completions", json.dumps({"messages": "hello"}).encode(), "messages"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode(), "messages"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -5}).encode(), "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 0}).encode(), "n must be"),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 1000}).encode(), "n must be"),
        ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 50}).encode(), "logprobs"),
        ("/v1/completions", json.dumps({"prompt": ""}).encode(), "empty"),
        ("/v1/completions", json.dumps({"prompt": [99999]}).encode(), "token ids"),
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"1": 5}}).encode(), "logit_bias"),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
            "image_url",
        ),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode(),
            "top_logprobs",
        ),
    ],
)
def test_bad_requests_are_400(live: LiveServer, path: str, raw: bytes, contains: str) -> None:
    with live.client() as http:
        resp = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert_openai_error(resp, 400, contains=contains)


def test_bad_slo_headers_are_400(live: LiveServer) -> None:
    body = {"prompt": "x", "max_tokens": 2}
    with live.client() as http:
        for header, value in [("x-slo-ttft-ms", "soon"), ("x-slo-tpot-ms", "-3"), ("x-slo-priority", "high")]:
            err = assert_openai_error(http.post("/v1/completions", json=body, headers={header: value}), 400)
            assert err["param"] == header


def test_unknown_model_is_404(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert exc.value.body["code"] == "model_not_found"


def test_prompt_too_long(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0)
    long = "The quick brown fox jumps over the lazy dog. " * 120  # far beyond the 512-token window
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=long, max_tokens=2)
    assert exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=2
        )
    assert exc.value.body["code"] == "context_length_exceeded"
    # Prompt fits, but prompt + max_tokens does not: refused like OpenAI and vLLM do.
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=10_000)
    assert "maximum context length" in exc.value.body["message"]


def test_unknown_route_and_method(live: LiveServer) -> None:
    with live.client() as http:
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert_openai_error(http.get("/v1/completions"), 405)


def test_server_keeps_serving_after_errors(live: LiveServer) -> None:
    with live.client() as http:
        for _ in range(3):
            http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        resp = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
        )
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3

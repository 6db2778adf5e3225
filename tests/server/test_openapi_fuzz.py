"""Property-based fuzz of the server's own OpenAPI document (schemathesis) against the tiny model: whatever
the generated request, valid or not, the answer is never a 5xx, its status is one the document lists for the
route, and the server still serves a normal request afterwards.

Deterministic for CI: Hypothesis derandomized (the examples are a function of the test), no example database,
and a bounded number of examples per route; generated requests are kept cheap (few output tokens, few choices).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server.settings import ServerSettings
from tests.server.conftest import MODEL, LiveServer, start_server

pytestmark = pytest.mark.slow

# Outputs generated requests may ask for: enough to exercise sampling, streaming and stops, cheap to run.
MAX_OUTPUT_TOKENS = 3
MAX_CHOICES = 2


@pytest.fixture(scope="module")
def fuzz_live(async_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    # An admin token the fuzz does not know: PUT /admin/policy is exercised (401/403) but never changes the
    # engine, which other test modules share.
    live = start_server(
        async_engine, ServerSettings(host="127.0.0.1", port=0, admin_token="not-for-the-fuzz")
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_live: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_live.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _cheap(body: Any, path: str, max_model_len: int) -> None:
    """Cap what a valid request would generate: a random tiny model rarely stops by itself, and `n` choices
    of a whole context window each would turn seconds into minutes. Values out of range stay as generated
    (their 400 is part of what is tested)."""
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", MAX_OUTPUT_TOKENS), ("max_completion_tokens", MAX_OUTPUT_TOKENS)):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and cap < value <= max_model_len:
            body[key] = cap
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and MAX_CHOICES < n <= 64:
        body["n"] = MAX_CHOICES
    if (
        path == "/v1/chat/completions"
        and body.get("max_tokens") is None
        and body.get("max_completion_tokens") is None
    ):
        body["max_completion_tokens"] = MAX_OUTPUT_TOKENS  # chat's default is the whole window


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_documented_statuses(case: Any, async_engine: AsyncLLMEngine) -> None:
    _cheap(case.body, case.path, async_engine.engine.max_model_len)
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance], timeout=30
    )


def test_serves_normally_after_the_fuzz(fuzz_live: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    with fuzz_live.client() as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

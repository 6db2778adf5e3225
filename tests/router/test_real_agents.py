"""End to end on loopback: two real `drift serve` processes (tiny model) behind `drift router` processes, driven
by the official `openai` client. The agents are started once for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.router.conftest import Harness, Proc, spawn, wait_ready, wait_until
from tests.tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow  # each agent imports torch and loads the model: several seconds on 2 cores

MODEL = "tiny"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    logs = tmp_path_factory.mktemp("agents")
    model = str(tiny_model_dir("llama"))
    args = ["serve", "--model", model, "--served-model-name", MODEL, "--num-kv-blocks", "128",
            "--max-num-seqs", "8", "--num-threads", "1", "--no-access-log"]  # fmt: skip
    procs = [spawn(args, logs / f"agent{i}.log") for i in range(2)]
    try:
        for p in procs:
            wait_ready(p)
        yield procs
    finally:
        for p in procs:
            p.stop()


def _router(agents: list[Proc], tmp: Path, policy: str) -> Iterator[Proc]:
    args = ["router", "--policy", policy, "--poll-interval-ms", "20"]
    for a in agents:
        args += ["--backend", a.url]
    proc = spawn(args, tmp / f"router-{policy}.log")
    try:
        wait_ready(proc, timeout=30)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def router(agents: list[Proc], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    yield from _router(agents, tmp_path_factory.mktemp("router"), "round-robin")


@pytest.fixture(scope="module")
def affinity_router(agents: list[Proc], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    yield from _router(agents, tmp_path_factory.mktemp("router"), "prefix-affinity")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _stream_deltas(client: openai.OpenAI, **kw: object) -> list[tuple[str, str | None]]:
    out = []
    for chunk in client.completions.create(model=MODEL, stream=True, **kw):  # type: ignore[call-overload]
        for c in chunk.choices:
            out.append((c.text, c.finish_reason))
    return out


def _chat_deltas(client: openai.OpenAI, **kw: object) -> list[tuple[str | None, str | None]]:
    out = []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):  # type: ignore[call-overload]
        for c in chunk.choices:
            out.append((c.delta.content, c.finish_reason))
    return out


def test_models_and_a_completion_through_the_router(router: Proc, agents: list[Proc]) -> None:
    client = _client(router.url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    via = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    direct = _client(agents[0].url).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert via.choices[0].text == direct.choices[0].text
    assert via.usage is not None and via.usage.completion_tokens == 8


def test_streaming_passes_through_token_for_token(router: Proc, agents: list[Proc]) -> None:
    kw = dict(prompt=PROMPT, max_tokens=12, temperature=0)
    direct = _stream_deltas(_client(agents[1].url), **kw)
    for _ in range(2):  # round-robin: one stream through each agent
        assert _stream_deltas(_client(router.url), **kw) == direct
    chat_kw = dict(messages=MESSAGES, max_tokens=10, temperature=0, stream_options={"include_usage": True})
    assert _chat_deltas(_client(router.url), **chat_kw) == _chat_deltas(_client(agents[0].url), **chat_kw)


def test_round_robin_uses_every_agent_and_ids_come_back(router: Proc, agents: list[Proc]) -> None:
    client = _client(router.url)
    seen = set()
    for i in range(4):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_headers={"x-request-id": f"rr{i}"}
        )
        assert (
            raw.parse().id == f"cmpl-rr{i}" and raw.headers["x-request-id"] == f"cmpl-rr{i}"
        )  # the agent echoes its id
        seen.add(raw.headers["x-drift-backend"])
    assert seen == {a.url for a in agents}


def test_affinity_sticks_a_conversation_to_one_agent(affinity_router: Proc, agents: list[Proc]) -> None:
    client = _client(affinity_router.url)
    homes: dict[str, set[str]] = {}
    for turn in range(3):
        for session in ("alice", "bob", "carol", "dave"):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[*MESSAGES, {"role": "assistant", "content": "Paris" * turn}],
                max_tokens=2,
                extra_headers={"x-session-id": session},
            )
            homes.setdefault(session, set()).add(raw.headers["x-drift-backend"])
    assert all(len(h) == 1 for h in homes.values()), homes
    metrics = httpx.get(f"{affinity_router.url}/metrics").text
    assert 'drift_router_decisions_total{policy="prefix-affinity",reason="sticky"} 8.0' in metrics


def test_a_full_replica_is_skipped_and_no_request_is_lost(harness_real: Harness, agents: list[Proc]) -> None:
    """A replica answering 429 (a fake) next to a real agent: every request succeeds; the full one is asked
    once, then skipped for its Retry-After."""
    full = harness_real.fake(mode="refuse", model=MODEL, retry_after="30")
    router = harness_real.router([full.url, agents[0].url], policy="round-robin")
    client = _client(router.url)
    for _ in range(3):
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert _stream_deltas(client, prompt=PROMPT, max_tokens=3)[-1][1] == "length"
    assert len(full.requests) == 1
    assert router.metric("drift_router_retries_total", backend=full.url, reason="429") == 1
    assert router.metric("drift_router_requests_total", backend=agents[0].url, code="200") == 4
    # Upstream TTFT is observed per backend for the stream.
    assert router.metric("drift_router_upstream_ttft_seconds_count", backend=agents[0].url) == 1


def test_the_agents_state_drives_the_load_the_router_sees(harness_real: Harness, agents: list[Proc]) -> None:
    router = harness_real.router([a.url for a in agents], policy="least-loaded")
    wait_until(lambda: all(b.state is not None for b in router.state.pool.backends.values()), "never polled")
    for b in router.state.pool.backends.values():
        assert b.state is not None and b.state.model == MODEL and b.state.block_size > 0
        assert b.state.kv_blocks_total == 128
    backends = httpx.get(f"{router.url}/backends").json()["backends"]
    assert {b["url"] for b in backends} == {a.url for a in agents} and all(b["routable"] for b in backends)


@pytest.fixture(scope="module")
def harness_real() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()

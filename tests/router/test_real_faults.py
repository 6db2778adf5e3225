"""Faults with real `drift serve` agents (tiny model) behind a real `drift router` process: a full agent's own
429 retried on another agent, and an agent killed mid-run (every request completes or gets a clear error, none
hangs). Everything is bounded by client timeouts and deadlines."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.router.conftest import Proc, spawn, wait_ready, wait_until
from tests.tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow

MODEL = "tiny"
AGENT_ARGS = ["--served-model-name", MODEL, "--num-kv-blocks", "128", "--num-threads", "1", "--no-access-log"]
# A long generation (the tiny model's context is 512 tokens) that holds an agent's only sequence slot.
LONG = {"model": MODEL, "prompt": "count", "max_tokens": 480, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    """`small`: one sequence at a time and a waiting queue of one (past it: 429). `a`, `b`: ordinary."""
    logs = tmp_path_factory.mktemp("agents")
    model = ["serve", "--model", str(tiny_model_dir("llama")), *AGENT_ARGS]
    procs = {
        "small": spawn([*model, "--max-num-seqs", "1", "--max-waiting-requests", "1"], logs / "small.log"),
        "a": spawn([*model, "--max-num-seqs", "8"], logs / "a.log"),
        "b": spawn([*model, "--max-num-seqs", "8"], logs / "b.log"),
    }
    try:
        for p in procs.values():
            wait_ready(p)
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _router(backends: list[Proc], log: Path, *extra: str) -> Proc:
    args = ["router", "--policy", "round-robin", "--poll-interval-ms", "20", *extra]
    for b in backends:
        args += ["--backend", b.url]
    proc = spawn(args, log)
    wait_ready(proc, timeout=30)
    return proc


def _state(agent: Proc) -> dict:
    return httpx.get(f"{agent.url}/state", timeout=5).json()


def _retries(router: Proc, backend: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{router.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "drift_router_retries_total" and s.labels == {"backend": backend, "reason": reason}:
                return s.value
    return 0.0


def test_a_real_agents_429_is_retried_on_another_real_agent(agents: dict[str, Proc], tmp_path: Path) -> None:
    """The small agent's slot and queue are filled directly; the router's request to it gets the agent's own
    429 (queue full) and is sent to the other agent. The fillers end on their own after a few seconds, so a
    round that found the queue already free is tried again, until the deadline."""
    small, other = agents["small"], agents["a"]
    router = _router([small, other], tmp_path / "router.log")
    try:
        client = httpx.Client(timeout=30)

        def fill() -> None:
            with client.stream("POST", f"{small.url}/v1/completions", json=LONG) as r:
                for _ in r.iter_bytes():
                    pass

        refused = False
        for _ in range(10):  # bounded rounds
            fillers = [threading.Thread(target=fill, daemon=True) for _ in range(2)]
            for t in fillers:
                t.start()
            wait_until(
                lambda f=fillers: _state(small)["waiting"] >= 1 or not any(t.is_alive() for t in f), "fill"
            )
            before = _retries(router, small.url, "429")
            # Round-robin: of two requests, one is offered to the small agent first.
            for _ in range(2):
                r = httpx.post(
                    f"{router.url}/v1/completions",
                    json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] is not None
            refused = _retries(router, small.url, "429") > before
            for t in fillers:
                t.join(60)
            if refused:
                break
        assert refused, "the small agent never answered 429 while full"
    finally:
        router.stop()


def _classify(resp_text: str, status: int) -> str:
    """'ok' (a complete stream), 'error' (an OpenAI error body, or an error event then [DONE])."""
    if status != 200:
        assert json.loads(resp_text)["error"]["message"], resp_text
        return "error"
    events = [line[6:] for line in resp_text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", resp_text[-500:]  # never cut without an end
    if any('"error"' in e for e in events[:-1]):
        return "error"
    return "ok"


def test_killing_an_agent_mid_run_leaves_no_request_hanging(agents: dict[str, Proc], tmp_path: Path) -> None:
    """Three agents, 24 streams in flight; one agent is SIGKILLed while streams run on it. Every request ends
    within its timeout: completed, or with a clear error (a 5xx body, or an error event then [DONE]) for
    the streams the dead agent was producing. Requests sent afterwards go to the survivors."""
    victim = agents["b"]
    router = _router([agents["a"], victim, agents["small"]], tmp_path / "router.log")
    try:
        body = {
            "model": MODEL,
            "prompt": "once upon a time",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }

        def one(_: int) -> str:
            r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=20)
            return _classify(r.text, r.status_code)

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            wait_until(lambda: _state(victim)["running"] > 0, "no stream ever ran on the victim")
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            outcomes = [f.result(timeout=30) for f in futures]  # none hangs
        assert set(outcomes) <= {"ok", "error"} and "ok" in outcomes, outcomes
        # After the kill: new requests complete on the survivors.
        for i in range(4):
            assert one(i) == "ok"
    finally:
        router.stop()

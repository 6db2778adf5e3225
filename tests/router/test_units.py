"""The router's pure parts: token estimate, Retry-After, header filtering, a backend as an `InstanceView`
(polled state plus optimistic updates), the policies over backends, and the command line."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest
from multidict import CIMultiDict

from drift_agent.cli import build_parser, main
from drift_agent.router.app import RouterSettings
from drift_agent.router.backend import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_PREFILL_S_PER_TOKEN,
    AgentState,
    Backend,
    BackendPool,
    estimate_prompt_tokens,
)
from drift_agent.router.proxy import (
    _only_openings,
    forward_headers,
    retry_after_s,
)
from drift_agent.routing.policies import RouteRequest, make_router
from drift_agent.routing.view import InstanceView


def _state(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model": "m", "ready": True, "draining": False, "engine_up": True, "waiting": 1, "running": 2,
        "pending_prefill_tokens": 100, "kv_blocks_total": 50, "kv_blocks_free": 40, "kv_used_tokens": 160,
        "block_size": 16, "perf": {"prefill_s_per_token": None, "decode_step_s": None, "decode_batch": 1},
    }  # fmt: skip
    return base | kw


def _backend(index: int = 0, **kw: object) -> Backend:
    b = Backend(f"http://b{index}", index)
    b.apply_state(AgentState.from_json(_state(**kw)), issued_at=0.0)
    return b


def test_prompt_tokens_are_estimated_without_a_tokenizer() -> None:
    assert estimate_prompt_tokens({"prompt": "x" * 40}) == 10
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens({"prompt": ["x" * 8, [1, 2]]}) == 4
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": "x" * 8}]}) == 4 + 2
    parts = [{"type": "text", "text": "x" * 12}]
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": parts}]}) == 4 + 3
    assert estimate_prompt_tokens({}) == 1


def test_retry_after_reads_seconds_and_dates_and_is_capped() -> None:
    assert retry_after_s("3", 1.0, 60.0) == 3.0
    assert retry_after_s(None, 1.0, 60.0) == 1.0
    assert retry_after_s("soon", 1.0, 60.0) == 1.0
    assert retry_after_s("100000", 1.0, 60.0) == 60.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1.0, 60.0) == 0.0  # in the past


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    h = CIMultiDict(
        [("Host", "r"), ("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"), ("X-Slo-Ttft-Ms", "9"),
         ("Content-Length", "3"), ("Transfer-Encoding", "chunked"), ("Accept", "a"), ("Accept", "b")]
    )  # fmt: skip
    out = forward_headers(h)
    assert list(out.items()) == [("X-Slo-Ttft-Ms", "9"), ("Accept", "a"), ("Accept", "b")]


def test_a_backend_is_an_instance_view_of_its_polled_state() -> None:
    b = _backend()
    assert isinstance(b, InstanceView)
    assert (b.pending_prefill_tokens, b.kv_used_tokens, b.load_tokens) == (100, 160, 260)
    assert b.kv_usage == pytest.approx(0.2) and b.free_kv_blocks == 40 and b.num_running == 2
    # No perf figures yet: the documented defaults.
    assert b.prefill_s(10) == pytest.approx(10 * DEFAULT_PREFILL_S_PER_TOKEN)
    assert b.queued_prefill_s() == pytest.approx(100 * DEFAULT_PREFILL_S_PER_TOKEN)
    assert b.decode_step_s(1, 0) == pytest.approx(DEFAULT_DECODE_STEP_S)
    measured = _backend(perf={"prefill_s_per_token": 0.001, "decode_step_s": 0.01, "decode_batch": 4})
    assert measured.prefill_s(10) == pytest.approx(0.01)
    assert measured.decode_step_s(4, 0) == pytest.approx(0.01)
    assert measured.decode_step_s(8, 0) > measured.decode_step_s(4, 0)
    # SLO attainment: the agent's window, None while it has classified nothing.
    assert b.slo_attainment is None
    assert _backend(slo={"ttft_ms": 1000.0, "attainment": 0.75}).slo_attainment == 0.75
    assert _backend(slo={"attainment": None}).slo_attainment is None


def test_what_was_sent_counts_until_a_poll_issued_after_it_replaces_the_estimate() -> None:
    b = _backend()
    b.note_sent(50, now=10.0)
    refused = b.note_sent(7, now=11.0)
    assert (b.pending_prefill_tokens, b.num_running) == (157, 4)
    b.forget_sent(refused)  # a refusal never joined its load
    assert (b.pending_prefill_tokens, b.num_running) == (150, 3)
    b.apply_state(
        AgentState.from_json(_state(pending_prefill_tokens=0)), issued_at=9.0
    )  # issued before: kept
    assert b.pending_prefill_tokens == 50
    b.apply_state(AgentState.from_json(_state(pending_prefill_tokens=30)), issued_at=10.5)
    assert (b.pending_prefill_tokens, b.num_running) == (30, 2)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ready": False}, "not_ready"),
        ({"draining": True}, "draining"),
        ({"engine_up": False}, "engine_down"),
    ],
)
def test_a_backend_that_is_not_ready_draining_or_down_is_not_routable(change: dict, reason: str) -> None:
    b = _backend(**change)
    assert b.unroutable_reason(0.0) == reason
    b.apply_state(AgentState.from_json(_state()), issued_at=0.0)
    assert b.routable(0.0)
    b.refused_until = 5.0
    assert b.unroutable_reason(4.9) == "refused" and b.routable(5.0)
    b.poll_failed("refused")
    assert b.unroutable_reason(10.0) == "state_failed"
    assert Backend("http://x", 1).unroutable_reason(0.0) == "state_failed"  # never polled


def test_bad_state_documents_are_refused_or_read_safely() -> None:
    with pytest.raises(ValueError):
        AgentState.from_json([1])
    s = AgentState.from_json({"ready": "yes", "running": "3", "perf": None})
    assert not s.ready and s.running == 0 and s.prefill_s_per_token is None and s.block_size == 16
    for bad in ("0.5", True, 1.5, -0.1, [0.5]):
        assert AgentState.from_json({"slo": {"attainment": bad}}).slo_attainment is None
    assert AgentState.from_json({"slo": "x"}).slo_attainment is None


@pytest.mark.parametrize(
    "policy", ["least-loaded", "least-kv", "slo-aware", "prefix-affinity", "round-robin"]
)
def test_every_policy_routes_over_backends(policy: str) -> None:
    busy = _backend(0, pending_prefill_tokens=5000, kv_blocks_free=5)
    idle = _backend(7, pending_prefill_tokens=0, kv_used_tokens=0, running=0)
    picked = make_router(policy).route(RouteRequest(prompt_tokens=10, affinity_key="k"), [busy, idle], 0.0)
    assert picked is (busy if policy == "round-robin" else idle)


def test_the_pool_follows_a_url_list_and_ids_are_stable_per_url() -> None:
    pool = BackendPool(0.05, 1.0)
    pool.set_urls(["http://a/", "http://b"])
    ids = {u: b.index for u, b in pool.backends.items()}
    assert ids == {"http://a": 0, "http://b": 1}
    pool.set_urls(["http://b", "http://c"])
    assert {u: b.index for u, b in pool.backends.items()} == {"http://b": 1, "http://c": 2}
    pool.set_urls(["http://a"])
    assert pool.backends["http://a"].index == 0  # back with its old id: affinity homes stay meaningful


def test_static_backends_are_never_removed_by_discovery() -> None:
    pool = BackendPool(0.05, 1.0)
    pool.add_static("http://static/")
    pool.set_urls(["http://a"])
    assert set(pool.backends) == {"http://static", "http://a"}
    pool.set_urls([])
    assert set(pool.backends) == {"http://static"}
    pool.set_urls(["http://static", "http://b"])  # discovered too: still one backend, still static
    pool.set_urls([])
    assert set(pool.backends) == {"http://static"} and pool.backends["http://static"].index == 0


def _router_parser() -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["router"]


def test_every_router_flag_says_what_it_does_and_its_default() -> None:
    parser = _router_parser()
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert "default" in (action.help or ""), action.option_strings
    assert "%(default)" not in parser.format_help()


def test_backends_are_given_after_one_flag_or_by_repeating_it() -> None:
    args = build_parser().parse_args(["router", "--backend", "http://a", "http://b", "--backend", "http://c"])
    assert args.backend == ["http://a", "http://b", "http://c"]


def test_the_command_line_refuses_a_router_without_backends_and_bad_settings(capsys) -> None:
    assert main(["router"]) == 2
    assert "--backend" in capsys.readouterr().err
    assert main(["router", "--backend", "http://a", "--discover", "no-slash"]) == 2
    assert "NAMESPACE/SERVICE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["router", "--policy", "nope"])
    with pytest.raises(ValueError):
        RouterSettings(policy="nope")
    assert main(["router", "--backend", "http://a", "--first-token-timeout-s", "0"]) == 2
    assert "timeouts" in capsys.readouterr().err
    assert main(["router", "--backend", "http://a", "--drain-seconds", "-1"]) == 2


def test_only_chat_openings_are_held_back() -> None:
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
    token = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
    assert _only_openings(b"") and _only_openings(role) and _only_openings(role + role)
    assert _only_openings(role + token[:20])  # the token's event is not complete yet
    assert not _only_openings(role + token)
    assert not _only_openings(b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "x"}]}\n\n')
    assert not _only_openings(b'data: {"error": {"message": "boom"}}\n\n')
    assert not _only_openings(b"data: [DONE]\n\n")


def test_a_refusal_during_a_poll_is_not_the_polls_transition() -> None:
    """The forwarder counts a refusal as the backend leaves the rotation; a poll in flight at that moment
    must not report the same transition again (it was counted twice)."""
    b = Backend("http://a", 0)
    b.apply_state(AgentState.from_json(_state()), issued_at=0.0)
    changes: list[tuple[str | None, str | None]] = []
    pool = BackendPool(0.05, 1.0, lambda _b, before, after: changes.append((before, after)))

    class Response:
        status = 200

        async def __aenter__(self) -> Response:
            b.refused_until = time.monotonic() + 30  # the forwarder's refusal, while the poll is in flight
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def json(self, content_type: str | None = None) -> dict:
            return _state()

    class Session:
        def get(self, url: str, timeout: object) -> Response:
            return Response()

    asyncio.run(pool.poll_once(b, Session()))  # type: ignore[arg-type]
    assert b.unroutable_reason(time.monotonic()) == "refused"
    assert changes == []

"""GET/PUT /admin/policy: bearer-token auth, validation through EngineConfig, applied on the engine thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from drift_agent.core.config import SLO_SETTINGS, EngineConfig, PartitionConfig, field_bounds
from drift_agent.server.admin import PartitionUpdate, PolicyUpdate, SloUpdate
from drift_agent.server.settings import ServerSettings
from tests.server.conftest import LiveServer, start_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def admin_live(async_engine) -> Iterator[LiveServer]:
    live = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, admin_token=TOKEN))
    with live.client() as http:
        original = http.get("/admin/policy").json()
    yield live
    with live.client() as http:  # the engine is shared with other test modules: put everything back
        assert http.put("/admin/policy", json=original, headers=AUTH).status_code == 200
    live.stop()


def test_get_shape(admin_live: LiveServer) -> None:
    with admin_live.client() as http:
        body = http.get("/admin/policy").json()
    assert set(body) == {"policy", "partition", "slo", "fairness", "preemption_mode"}
    assert set(body["partition"]) == {"mode", "prefill_sm_share", "backend", "fold_max_tokens", "tpot_margin"}
    assert body["partition"]["tpot_margin"] == 0.0
    assert set(body["slo"]) == {"ttft_ms", "tpot_ms"}
    assert body["policy"] == "chunked"


def test_auth(admin_live: LiveServer) -> None:
    change = {"slo": {"ttft_ms": 250.0}}
    with admin_live.client() as http:
        r = http.put("/admin/policy", json=change)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert (
            http.put("/admin/policy", json=change, headers={"Authorization": "Bearer wrong"}).status_code
            == 403
        )
        assert http.put("/admin/policy", json=change, headers={"Authorization": TOKEN}).status_code == 401
        assert http.get("/admin/policy").json()["slo"]["ttft_ms"] != 250.0
        r = http.put("/admin/policy", json=change, headers=AUTH)
        assert r.status_code == 200 and r.json()["slo"]["ttft_ms"] == 250.0


def test_apply_and_metrics(admin_live: LiveServer) -> None:
    with admin_live.client() as http:
        r = http.put(
            "/admin/policy",
            headers=AUTH,
            json={
                "policy": "prefill-first",
                "partition": {"mode": "static", "prefill_sm_share": 0.7, "fold_max_tokens": 0},
                "slo": {"ttft_ms": 500.0, "tpot_ms": 40.0},
            },
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "policy": "prefill-first",
            "partition": {
                "mode": "static",
                "prefill_sm_share": 0.7,
                "backend": "auto",
                "fold_max_tokens": 0,
                "tpot_margin": 0.0,
            },
            "slo": {"ttft_ms": 500.0, "tpot_ms": 40.0},
            "fairness": "none",
            "preemption_mode": "auto",
        }
        assert http.get("/admin/policy").json() == r.json()
        assert admin_live.async_engine.engine.config.policy == "prefill-first"
        # The new default targets and policy show in /metrics, and requests still run under the new policy.
        ok = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200
    m = admin_live.metrics()
    assert m[("drift_policy_info", frozenset({("policy", "prefill-first")}))] == 1
    assert m[("drift_policy_info", frozenset({("policy", "chunked")}))] == 0
    assert m[("drift_slo_target_seconds", frozenset({("phase", "ttft")}))] == 0.5
    assert m[("drift_slo_target_seconds", frozenset({("phase", "tpot")}))] == 0.04


def test_fairness_and_preemption_mode_change_at_run_time(admin_live: LiveServer) -> None:
    engine = admin_live.async_engine.engine
    with admin_live.client() as http:
        r = http.put("/admin/policy", headers=AUTH, json={"fairness": "vtc", "preemption_mode": "recompute"})
        assert r.status_code == 200, r.text
        assert r.json()["fairness"] == "vtc" and r.json()["preemption_mode"] == "recompute"
        assert engine.scheduler.vtc is not None and engine.scheduler.config.preemption_mode == "recompute"
        ok = http.post(
            "/v1/completions",
            json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
            headers={"x-client-id": "tenant-a"},
        )
        assert ok.status_code == 200
        assert engine.scheduler.vtc.counter("tenant-a") > 0
        bad = http.put("/admin/policy", headers=AUTH, json={"fairness": "lottery"})
        assert bad.status_code == 422 and "fairness" in bad.json()["error"]["message"]
        r = http.put("/admin/policy", headers=AUTH, json={"fairness": "none", "preemption_mode": "auto"})
        assert r.status_code == 200 and engine.scheduler.vtc is None


def test_kv_cache_view_shows_both_tiers(admin_live: LiveServer) -> None:
    with admin_live.client() as http:
        body = http.get("/admin/kv-cache").json()
    engine = admin_live.async_engine.engine
    assert body["device"]["blocks"] == engine.block_manager.num_blocks
    assert body["device"]["bytes"] == body["device"]["blocks"] * body["block_bytes"] > 0
    assert body["host"] == {"blocks": 0, "free_blocks": 0, "tokens": 0, "bytes": 0}  # no swap space
    assert set(body["copies"]) == {"out", "in"} and body["preemption_mode"] == engine.config.preemption_mode
    assert set(body["blocks_moved"]) == {"demoted", "promoted", "swapped_out", "swapped_in", "reused"}


def test_switch_to_multiplexing_policy(admin_live: LiveServer) -> None:
    with admin_live.client() as http:
        r = http.put(
            "/admin/policy", headers=AUTH, json={"policy": "static-split", "partition": {"mode": "static"}}
        )
        assert r.status_code == 200, r.text
        ok = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    m = admin_live.metrics()
    assert m[("drift_policy_info", frozenset({("policy", "static-split")}))] == 1
    prefill = m[("drift_partition_sm_share", frozenset({("phase", "prefill")}))]
    decode = m[("drift_partition_sm_share", frozenset({("phase", "decode")}))]
    assert 0 < prefill <= 1 and 0 < decode <= 1  # a static split gives both phases SMs


def test_tpot_margin_round_trips(admin_live: LiveServer) -> None:
    """The operator's lever under drift: settable alone, shown by GET, kept by a later partial update, and
    handed to the running drift dispatcher."""
    with admin_live.client() as http:
        r = http.put(
            "/admin/policy",
            headers=AUTH,
            json={"policy": "drift", "partition": {"mode": "auto", "tpot_margin": 0.25}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["policy"] == "drift" and r.json()["partition"]["tpot_margin"] == 0.25
        r = http.put("/admin/policy", headers=AUTH, json={"partition": {"tpot_margin": -0.5}})
        assert r.status_code == 200, r.text
        assert http.get("/admin/policy").json()["partition"]["tpot_margin"] == -0.5
        r = http.put("/admin/policy", headers=AUTH, json={"partition": {"prefill_sm_share": 0.4}})
        partition = r.json()["partition"]
        assert partition["tpot_margin"] == -0.5 and partition["prefill_sm_share"] == 0.4
    engine = admin_live.async_engine.engine
    assert engine.config.partition.tpot_margin == -0.5
    assert engine.scheduler.policy.dispatcher.config.tpot_margin == -0.5


@pytest.mark.parametrize(
    "change",
    [
        {"policy": "fastest"},
        {"partition": {"prefill_sm_share": 1.5}},
        {"partition": {"mode": "sometimes"}},
        {"partition": {"fold_max_tokens": -1}},
        {"partition": {"tpot_margin": 1.5}},
        {"partition": {"tpot_margin": -0.6}},
        {"partition": {"tpot_margin": "more"}},
        {"slo": {"ttft_ms": -1}},
        {"slo": {"tpot_ms": "fast"}},
        {"unknown": 1},
        {"partition": {"sms": 3}},
    ],
)
def test_invalid_values_are_422_and_change_nothing(admin_live: LiveServer, change: dict) -> None:
    with admin_live.client() as http:
        before = http.get("/admin/policy").json()
        r = http.put("/admin/policy", json=change, headers=AUTH)
        assert r.status_code == 422, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/admin/policy").json() == before


def test_malformed_body_is_422_but_only_after_auth(admin_live: LiveServer) -> None:
    with admin_live.client() as http:
        bad = {"content": b"{oops", "headers": {"content-type": "application/json"}}
        assert http.put("/admin/policy", **bad).status_code == 401
        assert (
            http.put("/admin/policy", content=b"{oops", headers={**bad["headers"], **AUTH}).status_code == 422
        )


def test_disabled_without_token(live: LiveServer) -> None:
    with live.client() as http:
        assert http.get("/admin/policy").status_code == 200
        r = http.put(
            "/admin/policy", json={"slo": {"ttft_ms": 1.0}}, headers={"Authorization": "Bearer anything"}
        )
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]


def test_update_models_are_the_engine_configs_fields_optional() -> None:
    """PUT's body is derived from the engine's schema: same fields, types and bounds, each optional."""
    assert set(PartitionUpdate.model_fields) == set(PartitionConfig.model_fields)
    for name, field in PartitionConfig.model_fields.items():
        assert field_bounds(PartitionUpdate.model_fields[name]) == field_bounds(field), name
        assert PartitionUpdate.model_fields[name].default is None
    for name, key in SLO_SETTINGS.items():
        assert field_bounds(SloUpdate.model_fields[name]) == field_bounds(EngineConfig.model_fields[key])
    update = PolicyUpdate.model_validate({"partition": {"tpot_margin": 0.2}, "slo": {"ttft_ms": 500}})
    assert update.engine_settings() == {
        "policy": None,
        "fairness": None,
        "preemption_mode": None,
        "partition": {"tpot_margin": 0.2},
        "slo_ttft_ms": 500,
        "slo_tpot_ms": None,
    }

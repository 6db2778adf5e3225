"""/metrics, parsed with prometheus_client's parser: vLLM's names, Drift's SLO counters and gauges."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server.settings import ServerSettings
from tests.server.conftest import MODEL, LiveServer, start_server, wait_idle

VLLM_FAMILIES = {
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:request_success": "counter",
}
DRIFT_FAMILIES = {
    "drift_slo_requests": "counter",
    "drift_slo_attainment": "gauge",
    "drift_partition_sm_share": "gauge",
    "drift_partition_config": "gauge",
    "drift_policy_info": "gauge",
}


def slo_counts(live: LiveServer) -> dict[tuple[str, str], float]:
    m = live.metrics()
    return {
        (phase, outcome): m[("drift_slo_requests_total", frozenset({("phase", phase), ("outcome", outcome)}))]
        for phase in ("ttft", "tpot", "both")
        for outcome in ("met", "missed")
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def complete(live: LiveServer, headers: dict[str, str], max_tokens: int = 4, stream: bool = False) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    with live.client() as http:
        r = http.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text


def test_families_and_types(live: LiveServer) -> None:
    complete(live, {})
    text = httpx.get(f"{live.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in {**VLLM_FAMILIES, **DRIFT_FAMILIES}.items():
        assert name in families, name
        assert families[name].type == kind, name
    for name in VLLM_FAMILIES:
        assert all(s.labels.get("model_name") == MODEL for s in families[name].samples), name
    assert "drift_gpu_utilization_ratio" not in families  # no GPU here: absent, not an error
    ttft_count = [
        s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")
    ]
    assert ttft_count[0].value >= 1
    policy = {s.labels["policy"]: s.value for s in families["drift_policy_info"].samples}
    assert policy["chunked"] == 1 and sum(policy.values()) == 1
    shares = {s.labels["phase"]: s.value for s in families["drift_partition_sm_share"].samples}
    assert shares == {"prefill": 1.0, "decode": 1.0}  # a sequential policy time-shares the whole GPU


def test_token_counters_move(live: LiveServer) -> None:
    lab = frozenset({("model_name", MODEL)})
    before = live.metrics()
    complete(live, {}, max_tokens=5)
    after = wait_idle(live)
    assert after[("vllm:generation_tokens_total", lab)] - before[("vllm:generation_tokens_total", lab)] == 5
    assert after[("vllm:prompt_tokens_total", lab)] > before[("vllm:prompt_tokens_total", lab)]
    assert after[("vllm:prefix_cache_queries_total", lab)] > before[("vllm:prefix_cache_queries_total", lab)]
    e2e = ("vllm:e2e_request_latency_seconds_count", lab)
    assert after[e2e] - before[e2e] == 1
    itl = ("vllm:inter_token_latency_seconds_count", lab)
    assert after[itl] - before[itl] == 4  # five tokens, one step each: four gaps


def test_slo_counters_loose_and_tight(live: LiveServer) -> None:
    before = slo_counts(live)
    complete(live, {"x-slo-ttft-ms": "1e9", "x-slo-tpot-ms": "1e9"})
    complete(live, {"x-slo-ttft-ms": "1e9", "x-slo-tpot-ms": "1e9"}, stream=True)
    after_loose = slo_counts(live)
    assert delta(after_loose, before) == {("ttft", "met"): 2, ("tpot", "met"): 2, ("both", "met"): 2}

    complete(live, {"x-slo-ttft-ms": "0.001", "x-slo-tpot-ms": "0.001"})
    after_tight = slo_counts(live)
    assert delta(after_tight, after_loose) == {
        ("ttft", "missed"): 1,
        ("tpot", "missed"): 1,
        ("both", "missed"): 1,
    }

    # Only the TPOT target impossible: TTFT met, TPOT missed, so "both" missed.
    complete(live, {"x-slo-ttft-ms": "1e9", "x-slo-tpot-ms": "0.001"})
    assert delta(slo_counts(live), after_tight) == {
        ("ttft", "met"): 1,
        ("tpot", "missed"): 1,
        ("both", "missed"): 1,
    }


def test_attainment_window(live: LiveServer) -> None:
    complete(live, {"x-slo-ttft-ms": "0.001"})
    m = live.metrics()
    for phase in ("ttft", "tpot", "both"):
        value = m[("drift_slo_attainment", frozenset({("phase", phase)}))]
        count = m[("drift_slo_window_requests", frozenset({("phase", phase)}))]
        assert 0.0 <= value <= 1.0 and count >= 1
    # The tight-SLO request is in the 60 s window: attainment is below 1.
    assert m[("drift_slo_attainment", frozenset({("phase", "both")}))] < 1.0


def configured(live: LiveServer) -> dict[str, float]:
    m = live.metrics()
    return {dict(labels)["setting"]: v for (name, labels), v in m.items() if name == "drift_partition_config"}


def test_partition_config_reports_configured_settings_and_follows_admin_puts(
    async_engine: AsyncLLMEngine,
) -> None:
    """`drift_partition_config` is what the engine is configured with (the operator compares it with what it
    pushed); `drift_partition_sm_share` stays the per-step split, which a time-sharing policy keeps at 1."""
    token = {"Authorization": "Bearer metrics-token"}
    live = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, admin_token="metrics-token"))
    try:
        with live.client() as http:
            original = http.get("/admin/policy").json()
        partition = async_engine.engine.config.partition
        assert configured(live) == {
            "prefill_sm_share": partition.prefill_sm_share,
            "tpot_margin": partition.tpot_margin,
            "fold_max_tokens": float(partition.fold_max_tokens),
        }
        change = {
            "policy": "chunked",
            "partition": {"prefill_sm_share": 0.3, "tpot_margin": 0.15, "fold_max_tokens": 512},
        }
        with live.client() as http:
            assert http.put("/admin/policy", json=change, headers=token).status_code == 200
        assert configured(live) == {"prefill_sm_share": 0.3, "tpot_margin": 0.15, "fold_max_tokens": 512.0}
        shares = live.metrics()
        for phase in ("prefill", "decode"):  # chunked time-shares the whole GPU, whatever the share
            assert shares[("drift_partition_sm_share", frozenset({("phase", phase)}))] == 1.0
    finally:
        with live.client() as http:  # the engine is shared with other test modules: put everything back
            assert http.put("/admin/policy", json=original, headers=token).status_code == 200
        live.stop()

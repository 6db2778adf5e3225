"""`drift bench serve` against the real `drift serve` (tiny model, loopback): a short run and a short sweep."""

from __future__ import annotations

import json

import pytest

from drift_agent.cli import main
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from tests.server.conftest import MODEL, start_server, tiny_engine_config, wait_idle
from tests.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def live():
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(num_threads=None)))
    engine.start()
    server = start_server(engine)
    yield server
    server.stop()
    engine.shutdown()


def bench_args(live, tmp_path, *extra: str) -> list[str]:
    return [
        "bench", "serve", "--base-url", live.url, "--model", MODEL, "--tokenizer", str(tiny_model_dir("llama")),
        "--workload", "random", "--input-len", "24", "--output-len", "6", "--num-prompts", "12",
        "--num-warmups", "1", "--seed", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_short_run_measures_every_request(live, tmp_path):
    out = tmp_path / "run.json"
    args = bench_args(live, tmp_path, "--request-rate", "30", "--slo", "ttft:30000", "tpot:30000")
    assert main([*args, "--save-result", str(out)]) == 0
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 12 * 6  # ignore_eos with fixed output lengths
    assert summary["slo_attainment"] == 1.0 and summary["request_goodput"] > 0
    assert summary["mean_ttft_ms"] > 0 and summary["mean_tpot_ms"] > 0
    # Every request really reached the engine and finished; the pool is empty again.
    m = wait_idle(live)
    assert m[("vllm:kv_cache_usage_perc", frozenset({("model_name", MODEL)}))] == 0


def test_impossible_slo_gives_zero_attainment(live, tmp_path):
    out = tmp_path / "tight.json"
    args = bench_args(live, tmp_path, "--request-rate", "30", "--slo", "ttft:0.001", "tpot:0.001")
    assert main([*args, "--save-result", str(out)]) == 0
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 12
    assert summary["slo_attainment"] == 0.0 and summary["request_goodput"] == 0.0
    # The server classified them too: the SLO headers reached it.
    missed = live.metric("drift_slo_requests_total", phase="ttft", outcome="missed")
    assert missed >= 12


def test_unreachable_server_is_a_one_line_error(capsys):
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "x", "--num-prompts", "1"])
    assert rc == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

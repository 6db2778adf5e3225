"""Pure pieces of the server: partition shares, buckets, settings, SLO headers, sampling mapping, logprobs,
the drain, and `drift serve` refusing bad configuration before loading anything."""

from __future__ import annotations

import asyncio
import json

import pytest

from drift_agent.core.config import EngineConfig
from drift_agent.core.sequence import SLO
from drift_agent.engine.sampler import TokenLogprobs
from drift_agent.server.drain import InFlight
from drift_agent.server.errors import APIError
from drift_agent.server.logprobs import chat_logprobs, completion_logprobs
from drift_agent.server.metrics import partition_shares, token_buckets
from drift_agent.server.protocol import ChatCompletionRequest, CompletionRequest
from drift_agent.server.sampling import check_context, sampling_params, slo_from_headers
from drift_agent.server.serving import sse
from drift_agent.server.settings import ServerSettings


def cfg(policy: str, mode: str = "auto", share: float = 0.6) -> EngineConfig:
    return EngineConfig(policy=policy, partition={"mode": mode, "prefill_sm_share": share})


def test_partition_shares() -> None:
    assert partition_shares(cfg("chunked", "static")) == (1.0, 1.0)
    assert partition_shares(cfg("prefill-first"), (10, 20)) == (1.0, 1.0)
    assert partition_shares(cfg("static-split", "auto", 0.6)) == pytest.approx((0.6, 0.4))
    assert partition_shares(cfg("drift", "static", 0.7)) == pytest.approx((0.7, 0.3))
    assert partition_shares(cfg("drift", "auto")) == (1.0, 1.0)  # no split chosen yet
    assert partition_shares(cfg("drift", "auto"), (96, 36)) == pytest.approx((96 / 132, 36 / 132))
    # A shared partitioner gives a running phase the whole device, whatever split was asked for.
    assert partition_shares(cfg("drift", "auto"), (96, 36), (132, 132), 132) == (1.0, 1.0)
    assert partition_shares(cfg("drift", "auto"), (0, 132), (0, 132), 132) == (0.0, 1.0)


def test_token_buckets() -> None:
    assert token_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_sse_events_stay_on_one_line_for_splitlines_clients() -> None:
    # Generated text may hold U+2028, U+2029 or U+0085; clients such as httpx's iter_lines split lines there.
    text = "a\u2028b\u2029c\x85d\ne"
    for payload in ({"text": text}, ChatCompletionRequest(messages=[{"role": "user", "content": text}])):
        event = sse(payload)
        assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
        body = json.loads(event.removeprefix("data: "))
        assert (body.get("text") or body["messages"][0]["content"]) == text


def test_settings_from_env_and_flags() -> None:
    s = ServerSettings.from_sources(
        {"DRIFT_ADMIN_TOKEN": "tok-9f3", "DRIFT_SLO_WINDOW_S": "30"}, port=9000, slo_window_s=None
    )
    assert s.admin_token_value() == "tok-9f3" and s.slo_window_s == 30 and s.port == 9000
    assert "tok-9f3" not in repr(s)  # the token never shows in logs
    assert ServerSettings.from_sources({}).admin_token_value() is None
    with pytest.raises(ValueError):
        ServerSettings.from_sources({"DRIFT_SLO_WINDOW_S": "-1"})


def test_slo_headers() -> None:
    config = EngineConfig(slo_ttft_ms=800, slo_tpot_ms=50)
    assert config.default_slo == SLO(0.8, 0.05)  # the engine carries seconds
    slo = slo_from_headers({}, config)
    assert (slo.ttft, slo.tpot, slo.priority) == (0.8, 0.05, 0)
    slo = slo_from_headers({"x-slo-ttft-ms": "200", "x-slo-priority": "3"}, config, body_priority=1)
    assert (slo.ttft, slo.tpot, slo.priority) == (0.2, 0.05, 3)
    assert slo_from_headers({}, config, body_priority=2).priority == 2
    for bad in ("0", "-1", "inf", "nan", "fast"):
        with pytest.raises(APIError):
            slo_from_headers({"x-slo-tpot-ms": bad}, config)


def test_sampling_params_mapping() -> None:
    req = CompletionRequest(
        prompt="x",
        max_tokens=5,
        temperature=0.5,
        stop="END",
        seed=10,
        top_k=-1,
        logprobs=2,
        ignore_eos=True,
        n=2,
    )
    p1 = sampling_params(req, 1)
    assert (p1.max_tokens, p1.temperature, p1.stop, p1.seed, p1.top_k, p1.logprobs, p1.ignore_eos, p1.n) == (
        5,
        0.5,
        ["END"],
        11,
        0,
        2,
        True,
        1,
    )
    chat = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        max_tokens=9,
        max_completion_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    pc = sampling_params(chat, 0)
    assert pc.max_tokens == 4 and pc.logprobs == 3 and pc.seed is None
    assert (
        sampling_params(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]), 0).max_tokens
        is None
    )
    with pytest.raises(APIError, match="max_tokens"):
        sampling_params(CompletionRequest(prompt="x", max_tokens=-1), 0)


def test_check_context() -> None:
    check_context(10, 6, 16, "prompt")
    check_context(10, None, 16, "prompt")
    with pytest.raises(ValueError, match="maximum context length"):
        check_context(10, 7, 16, "prompt")
    with pytest.raises(ValueError):
        check_context(16, None, 16, "prompt")


def test_logprob_shapes() -> None:
    names = {1: "a", 2: "bc", 3: "d"}
    tls = [
        TokenLogprobs(1, -0.5, 1, [(1, -0.5), (3, -1.0)]),
        TokenLogprobs(2, float("-inf"), 3, [(3, -0.1), (1, -0.2)]),
    ]
    out = completion_logprobs(tls, names.__getitem__, 1, 5)
    assert out.tokens == ["a", "bc"] and out.text_offset == [5, 6]
    assert out.token_logprobs == [-0.5, -9999.0]  # -inf is not JSON
    assert out.top_logprobs == [{"a": -0.5}, {"d": -0.1, "bc": -9999.0}]
    entries = chat_logprobs(tls, names.__getitem__, 2)
    assert [e.token for e in entries] == ["a", "bc"] and entries[0].bytes == [97]
    assert [t.token for t in entries[1].top_logprobs] == ["d", "a"]


class FakeGroup:
    def __init__(self, inflight: InFlight) -> None:
        self.inflight = inflight
        self.aborted: str | None = None

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.inflight.remove(self)  # type: ignore[arg-type]


async def test_drain_waits_then_aborts() -> None:
    inflight = InFlight()
    assert await inflight.drain(0.0) is True and inflight.draining
    inflight = InFlight()
    quick, slow = FakeGroup(inflight), FakeGroup(inflight)
    inflight.add(quick)  # type: ignore[arg-type]
    inflight.add(slow)  # type: ignore[arg-type]
    asyncio.get_running_loop().call_later(0.05, inflight.remove, quick)
    assert await inflight.drain(0.3) is False
    assert quick.aborted is None and slow.aborted == "shutdown" and len(inflight) == 0


async def test_drain_finishes_in_time() -> None:
    inflight = InFlight()
    group = FakeGroup(inflight)
    inflight.add(group)  # type: ignore[arg-type]
    asyncio.get_running_loop().call_later(0.05, inflight.remove, group)
    assert await inflight.drain(5.0) is True and group.aborted is None


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--max-num-seqs", "0"], {}),
        (["--port", "70000"], {}),
        (["--prefill-sm-share", "2"], {}),
        (["--fold-max-tokens", "-1"], {}),
        ([], {"DRIFT_SLO_WINDOW_S": "soon"}),
        ([], {"DRIFT_POLICY": "fastest"}),
    ],
)
def test_serve_refuses_bad_config(argv: list[str], env: dict[str, str], monkeypatch, capsys) -> None:
    from drift_agent.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drift serve: invalid configuration:") and len(err.strip().splitlines()) == 1


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Loading the engine is a test failure: these errors must come before it."""
    from drift_agent.engine.llm_engine import LLMEngine

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(LLMEngine, "__init__", refuse)


def _serve_error(argv: list[str], capsys) -> str:
    from drift_agent.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drift serve: error: ") and "\n" not in err, err
    return err


def test_serve_refuses_a_port_in_use_before_loading(no_model_load, capsys) -> None:
    import socket

    from tests.tiny_models import tiny_model_dir

    model = str(tiny_model_dir("llama"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _serve_error(["--host", "127.0.0.1", "--port", str(port), "--model", model], capsys)
    assert f"127.0.0.1:{port}" in err and "already in use" in err


def test_serve_refuses_cuda_without_a_gpu(no_model_load, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "no CUDA GPU" in _serve_error(["--port", "0", "--device", "cuda"], capsys)


def test_serve_refuses_a_missing_model_directory(no_model_load, tmp_path, capsys) -> None:
    err = _serve_error(["--port", "0", "--model", str(tmp_path / "nope")], capsys)
    assert "does not exist" in err
    assert "no config.json" in _serve_error(["--port", "0", "--model", str(tmp_path)], capsys)


def test_serve_refuses_max_model_len_above_the_models(no_model_load, capsys) -> None:
    from tests.tiny_models import tiny_model_dir

    model = str(tiny_model_dir("llama"))  # max_position_embeddings 512
    err = _serve_error(["--port", "0", "--model", model, "--max-model-len", "4096"], capsys)
    assert "max_model_len 4096 exceeds the model's maximum context length 512" in err


def test_max_model_len_limit_follows_rope_scaling() -> None:
    from drift_agent.models.loader import MaxModelLenError, model_max_len, resolve_max_model_len

    assert model_max_len({}) == 4096  # what the engine assumes without max_position_embeddings
    plain = {"max_position_embeddings": 2048}
    assert resolve_max_model_len(plain, None) == 2048 and resolve_max_model_len(plain, 1024) == 1024
    with pytest.raises(MaxModelLenError, match="exceeds"):
        resolve_max_model_len(plain, 2049)
    linear = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert model_max_len(linear) == 16384
    yarn = {
        "max_position_embeddings": 40960,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    assert model_max_len(yarn) == 131072
    llama3 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert model_max_len(llama3) == 131072  # already the stretched length


class FakeNvml:
    """Just enough of pynvml for two GPUs, the second without power sensing."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int):  # noqa: N802
        return type("U", (), {"gpu": 40 + h})()

    def nvmlDeviceGetMemoryInfo(self, h: int):  # noqa: N802
        return type("M", (), {"used": 1024 * (h + 1), "total": 8192})()

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        if h == 1:
            raise self.NVMLError("not supported")
        return 250_000


def test_gpu_collector(monkeypatch) -> None:
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from drift_agent.server.gpu_metrics import GpuCollector

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    assert samples[("drift_gpu_utilization_ratio", "0")] == 0.40
    assert samples[("drift_gpu_memory_used_bytes", "1")] == 2048
    assert samples[("drift_gpu_memory_total_bytes", "0")] == 8192
    assert samples[("drift_gpu_power_watts", "0")] == 250.0
    assert ("drift_gpu_power_watts", "1") not in samples

    class Broken(FakeNvml):
        def nvmlInit(self) -> None:  # noqa: N802
            raise FakeNvml.NVMLError("driver not loaded")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    empty = CollectorRegistry()
    empty.register(GpuCollector())
    assert generate_latest(empty) == b""

"""One tiny-model engine per test session, and real uvicorn servers on loopback ports around it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from drift_agent.core.config import EngineConfig
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.server.app import build_app
from drift_agent.server.settings import ServerSettings
from drift_agent.server.uvicorn_server import DrainingServer
from tests.tiny_models import tiny_model_dir

MODEL = "tiny-llama"


def tiny_engine_config(**overrides: object) -> EngineConfig:
    base: dict[str, object] = dict(
        model=str(tiny_model_dir("llama")),
        served_model_name=MODEL,
        num_kv_blocks=512,
        block_size=16,
        max_num_seqs=96,
        num_threads=1,
    )
    return EngineConfig(**(base | overrides))


@dataclass
class LiveServer:
    server: DrainingServer
    thread: threading.Thread
    url: str
    async_engine: AsyncLLMEngine

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics, parsed with prometheus_client's own parser."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics()[(name, frozenset(labels.items()))]

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"


def start_server(async_engine: AsyncLLMEngine, settings: ServerSettings | None = None) -> LiveServer:
    settings = settings or ServerSettings(host="127.0.0.1", port=0)
    app = build_app(async_engine, settings, gpu_metrics=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = DrainingServer(config, app.state.drift.inflight, settings.shutdown_timeout_s)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(server, thread, f"http://127.0.0.1:{port}", async_engine)


def wait_idle(live: LiveServer, timeout: float = 10.0) -> dict[tuple[str, frozenset], float]:
    """Poll /metrics until nothing runs or waits and the KV pool is empty again; return that scrape."""
    lab = frozenset({("model_name", MODEL)})
    deadline = time.monotonic() + timeout
    while True:
        m = live.metrics()
        idle = (
            m[("vllm:num_requests_running", lab)] == 0
            and m[("vllm:num_requests_waiting", lab)] == 0
            and m[("vllm:kv_cache_usage_perc", lab)] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@pytest.fixture(scope="session")
def tiny_engine() -> LLMEngine:
    return LLMEngine(tiny_engine_config())


@pytest.fixture(scope="session")
def async_engine(tiny_engine: LLMEngine) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def live(async_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    server = start_server(async_engine)
    yield server
    server.stop()


@pytest.fixture
def doomed() -> Iterator[LiveServer]:
    """A server of its own whose engine loop the test kills."""
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(num_kv_blocks=64)))
    server = start_server(engine)
    yield server
    server.stop()
    engine.shutdown()

"""Offline throughput: the same prompts and output lengths through Drift's engine and through transformers'
batched `generate`, in one run, so the ratio is measured on the same machine at the same moment.

Both sides generate exactly each request's target output length (Drift with ignore_eos + max_tokens;
transformers with `min_new_tokens == max_new_tokens` per batch, its longest target), and both are credited only
with the target lengths: the tokens transformers computes past a shorter request's target in a padded static
batch are the cost of static batching that continuous batching removes.

`--served` instead sends the same prompts (as token ids) and lengths through a real `drift serve` subprocess
of the same engine config, every request at once with SSE streaming, so the served/engine ratio is the cost of
the HTTP/streaming layer. The client here is deliberately lean (it parses only each stream's last event) and
its CPU time is reported, since it shares the machine's cores with the server.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.config import EngineConfig


@dataclass
class OfflineWorkload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    vocab_ids: list[int], num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> OfflineWorkload:
    """Random token prompts (vLLM's `random` dataset), lengths uniform in the given inclusive ranges."""
    rng = random.Random(seed)
    prompts = [[rng.choice(vocab_ids) for _ in range(rng.randint(*input_len))] for _ in range(num_prompts)]
    outs = [rng.randint(*output_len) for _ in range(num_prompts)]
    return OfflineWorkload(prompts, outs)


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    prompt_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.seconds


def run_drift(engine, wl: OfflineWorkload) -> RunResult:
    from ..core.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    t0 = time.perf_counter()
    outs = engine.generate(wl.prompts, params)
    dt = time.perf_counter() - t0
    produced = sum(o.num_output_tokens for o in outs)
    if produced != wl.num_output_tokens:
        raise RuntimeError(f"drift produced {produced} tokens, expected {wl.num_output_tokens}")
    return RunResult("drift", dt, produced, wl.num_prompt_tokens)


def run_transformers(model, pad_id: int, wl: OfflineWorkload, batch_size: int) -> RunResult:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(wl.prompts), batch_size):
            prompts = wl.prompts[start : start + batch_size]
            target = max(wl.output_lens[start : start + batch_size])
            width = max(map(len, prompts))
            # Left padding, as decoder-only batched generation requires.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=target,
                min_new_tokens=target,
                do_sample=False,
                pad_token_id=pad_id,
            )
    dt = time.perf_counter() - t0
    return RunResult("transformers", dt, wl.num_output_tokens, wl.num_prompt_tokens)


def compare(drift: RunResult, hf: RunResult) -> dict:
    return {
        "drift": asdict(drift) | {"output_tokens_per_s": drift.output_tokens_per_s},
        "transformers": asdict(hf) | {"output_tokens_per_s": hf.output_tokens_per_s},
        "ratio_output_tokens_per_s": drift.output_tokens_per_s / hf.output_tokens_per_s,
    }


# ---- the same work through `drift serve` (--served) --------------------------------------------------------


@dataclass
class ServedResult(RunResult):
    client_cpu_s: float = 0.0  # this process (the HTTP client) while the served run lasted
    server_cpu_s: float = 0.0  # the `drift serve` process, all its threads
    loop_cpu_s: float = 0.0  # of which its main thread: uvicorn's event loop (HTTP, SSE, the routes)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(
    config: EngineConfig, host: str = "127.0.0.1", startup_timeout_s: float = 900.0
) -> Iterator[tuple[str, Any]]:
    """A real `drift serve` of `config` (the benchmark's own resolved engine config, through --config) on a
    free loopback port; yields (base url, psutil.Process). Stopped with SIGTERM (graceful drain) at exit."""
    import httpx
    import psutil
    import yaml

    port = free_port(host)
    with tempfile.TemporaryDirectory(prefix="drift-served-") as tmp:
        cfg = Path(tmp) / "engine.yaml"
        cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "drift_agent.cli", "serve", "--config", str(cfg), "--host", host,
               "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        log = open(Path(tmp) / "serve.log", "w+")  # noqa: SIM115 - read back on failure
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{host}:{port}"
        try:
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"drift serve exited with {proc.returncode}: {log.read()[-2000:]}")
                try:
                    if httpx.get(f"{url}/ready", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"drift serve did not become ready in {startup_timeout_s:.0f} s")
                time.sleep(0.2)
            yield url, psutil.Process(proc.pid)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


async def _stream_one(http: Any, url: str, prompt: list[int], output_len: int) -> int:
    """Stream one completion; returns the server's completion_tokens. Only the last event is parsed, so the
    client spends as little of the shared CPU as a streaming client can (bytes are still read as they come)."""
    import json

    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "min_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tail = b""
    async with http.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for part in resp.aiter_raw():
            tail = (tail + part)[-4096:]
    events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: ")]
    if len(events) < 2 or events[-1] != b"data: [DONE]":
        raise RuntimeError(f"stream did not end with a usage chunk and [DONE]: {tail[-300:]!r}")
    usage = json.loads(events[-2][len(b"data: ") :]).get("usage") or {}
    return int(usage.get("completion_tokens", 0))


async def _send_all(base_url: str, wl: OfflineWorkload) -> int:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0), trust_env=False) as http:
        url = f"{base_url}/v1/completions"
        # Every request at once, as engine.generate adds them all at once.
        counts = await asyncio.gather(
            *(_stream_one(http, url, p, n) for p, n in zip(wl.prompts, wl.output_lens, strict=True))
        )
    return sum(counts)


def run_served(base_url: str, server: Any, wl: OfflineWorkload) -> ServedResult:
    """The workload through HTTP streaming (/v1/completions, token-id prompts, greedy, exact lengths)."""
    cpu0, srv0, loop0 = time.process_time(), server.cpu_times(), _main_thread_cpu(server)
    t0 = time.perf_counter()
    produced = asyncio.run(_send_all(base_url, wl))
    dt = time.perf_counter() - t0
    cpu1, srv1, loop1 = time.process_time(), server.cpu_times(), _main_thread_cpu(server)
    if produced != wl.num_output_tokens:
        raise RuntimeError(f"drift serve produced {produced} tokens, expected {wl.num_output_tokens}")
    return ServedResult(
        "served",
        dt,
        produced,
        wl.num_prompt_tokens,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s=(srv1.user + srv1.system) - (srv0.user + srv0.system),
        loop_cpu_s=loop1 - loop0,
    )


def _main_thread_cpu(proc: Any) -> float:
    """CPU seconds of the process's main thread (its thread id is the process id on Linux); 0 elsewhere."""
    for t in proc.threads():
        if t.id == proc.pid:
            return t.user_time + t.system_time
    return 0.0


def compare_served(engine: RunResult, served: ServedResult) -> dict:
    return {
        "drift": asdict(engine) | {"output_tokens_per_s": engine.output_tokens_per_s},
        "served": asdict(served) | {"output_tokens_per_s": served.output_tokens_per_s},
        "ratio_served_to_engine": served.output_tokens_per_s / engine.output_tokens_per_s,
    }

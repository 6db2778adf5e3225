"""`drift router` against the alternatives, on real processes on loopback, in one run.

    python scripts/bench_router.py [--agents 3] [--num-prompts 48] [--request-rate 1.5] [--save-result F.json]
    python scripts/bench_router.py --only cpu      # the router's own CPU cost, against a fake upstream

Five measurements, each printed as a table (figures for docs/benchmarks.md, markdown rows at the end):

1. `policies`: routing policies on a multi-turn workload (`drift bench serve --workload multi-turn`): fresh
   agents for each router, so every run starts with cold prefix caches; the prefix-cache hit rate summed over
   the agents (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`), mean and P50 TTFT, P50 TPOT and SLO
   attainment, for `drift router` with prefix-affinity, slo-aware, least-loaded, round-robin and random (what a
   Kubernetes Service's kube-proxy does), and for `vllm-router --policy cache_aware` when it is installed.
2. `overhead`: the same traffic straight to one agent and through each router (one backend), in the order
   A B C C B A, `--overhead-repeats` times: P50 TTFT and TPOT, mean and spread over the runs. Two loads: one
   request at a time, and one agent's share of the multi-turn load of part 1 (its rate / `--agents`).
3. `kill`: an agent killed in the middle of a run: every request completes or fails with an error, none hangs.
4. `cpu`: the router's CPU time per non-streaming request and per relayed stream event, against a fake upstream
   (its own process) that answers at once: `/proc/PID/stat` user+system time of the router process over each
   phase, less its idle cost (polling `/state`) over the same wall time. Then the latency the router adds, one
   request at a time against the same fake upstream: P50 direct and through the router, non-streaming and to a
   stream's first event.
5. `sim`: `drift sim run` with the count, rate, lengths, turns, think time, seed and SLO of part 1, per policy
   (a GPU preset, or `--sim-profile` from `drift profile`): simulated hit rate and mean TTFT.

The agents run the embedded model with one torch thread each, so several share a small machine; absolute
figures move with the machine, the comparisons within one run do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
DRIFT = [sys.executable, "-m", "drift_agent.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str = "/ready", timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url}{path} not ready in {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Agents:
    urls: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def prefix_cache(self) -> tuple[float, float]:
        """(hits, queries) in prompt tokens, summed over the agents still alive."""
        hits = queries = 0.0
        for url, proc in zip(self.urls, self.procs, strict=True):
            if proc.poll() is not None:
                continue
            text = httpx.get(url + "/metrics", timeout=5, trust_env=False).text
            hits += _metric(text, "vllm:prefix_cache_hits_total")
            queries += _metric(text, "vllm:prefix_cache_queries_total")
        return hits, queries

    def requests(self) -> list[float]:
        out = []
        for url, proc in zip(self.urls, self.procs, strict=True):
            if proc.poll() is not None:
                out.append(float("nan"))
                continue
            text = httpx.get(url + "/metrics", timeout=5, trust_env=False).text
            out.append(_metric(text, "vllm:request_success_total"))
        return out


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def agents(n: int, logs: Path) -> Iterator[Agents]:
    ports = [free_port() for _ in range(n)]
    procs = []
    try:
        for i, port in enumerate(ports):
            log = open(logs / f"agent{i}.log", "w")  # noqa: SIM115 - closed with the process
            cmd = [*DRIFT, "serve", "--host", HOST, "--port", str(port), "--num-threads", "1",
                   "--log-level", "warning", "--no-access-log"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        urls = [f"http://{HOST}:{p}" for p in ports]
        for url, proc in zip(urls, procs, strict=True):
            wait_ready(url, proc)
        yield Agents(urls, procs)
    finally:
        for proc in procs:
            stop(proc)


_router_pids: dict[str, int] = {}  # router URL -> its process id (the CPU part reads its CPU time)


@contextlib.contextmanager
def router(kind: str, policy: str, backends: list[str], logs: Path) -> Iterator[str]:
    port = free_port()
    if kind == "drift":
        cmd = [
            *DRIFT,
            "router",
            "--host",
            HOST,
            "--port",
            str(port),
            "--policy",
            policy,
            "--backend",
            *backends,
        ]
        ready = "/ready"
    else:
        exe = shutil.which("vllm-router")
        assert exe, "vllm-router is not installed"
        # Its metrics listener defaults to port 29000: a free one, so a leftover router cannot block it.
        cmd = [exe, "--host", HOST, "--port", str(port), "--policy", policy, "--worker-urls", *backends,
               "--log-level", "warning", "--prometheus-port", str(free_port())]  # fmt: skip
        ready = "/health"
    log = open(logs / f"router-{kind}-{policy}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    _router_pids[url] = proc.pid
    try:
        wait_ready(url, proc, ready, timeout_s=120)
        yield url
    finally:
        _router_pids.pop(url, None)
        stop(proc)


def bench(url: str, tokenizer: str, out: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [*DRIFT, "bench", "serve", "--base-url", url, "--tokenizer", tokenizer, "--no-progress",
           "--save-result", str(out), "--seed", str(args.seed), "--slo", f"ttft:{args.slo_ttft_ms}",
           f"tpot:{args.slo_tpot_ms}", "--request-timeout", "120"]  # fmt: skip
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    doc = json.loads(out.read_text())
    return doc["runs"][0]["summary"] if "runs" in doc else doc


def ms(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def policies(args: argparse.Namespace, tokenizer: str, logs: Path) -> list[dict[str, Any]]:
    setups = [("drift", p) for p in args.drift_policies]
    if shutil.which("vllm-router"):
        setups.append(("vllm-router", "cache_aware"))
    rows = []
    workload = {
        "workload": "multi-turn",
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "mean_turns": args.mean_turns,
        "think_time": args.think_time,
    }
    for kind, policy in setups:
        with agents(args.agents, logs) as ag, router(kind, policy, ag.urls, logs) as url:
            s = bench(url, tokenizer, logs / f"{kind}-{policy}.json", args, **workload)
            hits, queries = ag.prefix_cache()
            rows.append(
                {
                    "router": f"{kind} {policy}",
                    "hit_rate": hits / queries if queries else None,
                    "mean_ttft_ms": s.get("mean_ttft_ms"),
                    "p50_ttft_ms": s.get("median_ttft_ms"),
                    "p50_tpot_ms": s.get("median_tpot_ms"),
                    "slo_attainment": s.get("slo_attainment"),
                    "completed": s.get("completed"),
                    "per_agent": ag.requests(),
                }
            )
            r = rows[-1]
            print(
                f"{r['router']:<28} hit {100 * (r['hit_rate'] or 0):5.1f}%  mean TTFT {ms(r['mean_ttft_ms'])} ms"
                f"  P50 TTFT {ms(r['p50_ttft_ms'])} ms  P50 TPOT {ms(r['p50_tpot_ms'])} ms  "
                f"SLO {100 * (r['slo_attainment'] or 0):.1f}%  per agent {r['per_agent']}",
                flush=True,
            )
    return rows


def overhead(args: argparse.Namespace, tokenizer: str, logs: Path) -> list[dict[str, Any]]:
    """One agent: straight, through drift router, through vllm-router, in the order A B C C B A, repeated
    `--overhead-repeats` times, so a drift of the machine's speed during the run falls on every path alike.
    Two loads: one request at a time, and one agent's share of part 1's multi-turn load."""
    loads = {
        "one at a time": {
            "workload": "random", "num_prompts": 40, "input_len": 128, "output_len": 32, "max_concurrency": 1,
        },
        f"multi-turn, 1/{args.agents} of part 1": {
            "workload": "multi-turn", "num_prompts": max(1, args.num_prompts // args.agents),
            "request_rate": args.request_rate / args.agents, "input_len": args.input_len,
            "output_len": args.output_len, "mean_turns": args.mean_turns, "think_time": args.think_time,
        },
    }  # fmt: skip
    rows = []
    for load_name, load in loads.items():
        with agents(1, logs) as ag:
            bench(ag.urls[0], tokenizer, logs / "warm.json", args, **load)  # warm caches and allocator
            routers: dict[str, contextlib.AbstractContextManager[str]] = {
                "drift router": router("drift", "prefix-affinity", ag.urls, logs)
            }
            if shutil.which("vllm-router"):
                routers["vllm-router"] = router("vllm-router", "cache_aware", ag.urls, logs)
            with contextlib.ExitStack() as stack:
                urls = {"direct": ag.urls[0]} | {n: stack.enter_context(ctx) for n, ctx in routers.items()}
                order = (list(urls) + list(reversed(urls))) * args.overhead_repeats
                figures: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
                for i, name in enumerate(order):
                    s = bench(urls[name], tokenizer, logs / f"overhead-{i}.json", args, **load)
                    figures[name].append((s["median_ttft_ms"], s["median_tpot_ms"]))
        for name, runs in figures.items():
            ttft = [r[0] for r in runs]
            tpot = [r[1] for r in runs]
            row = {
                "load": load_name,
                "path": name,
                "p50_ttft_ms": statistics.fmean(ttft),
                "p50_ttft_spread_ms": max(ttft) - min(ttft),
                "p50_tpot_ms": statistics.fmean(tpot),
                "p50_tpot_spread_ms": max(tpot) - min(tpot),
                "runs": runs,
            }
            rows.append(row)
            print(
                f"{load_name:<24} {name:<14} P50 TTFT {row['p50_ttft_ms']:.2f} ms (spread "
                f"{row['p50_ttft_spread_ms']:.2f})  P50 TPOT {row['p50_tpot_ms']:.2f} ms (spread "
                f"{row['p50_tpot_spread_ms']:.2f})  over {len(runs)} runs",
                flush=True,
            )
    return rows


def kill_one(args: argparse.Namespace, tokenizer: str, logs: Path) -> dict[str, Any]:
    """Three agents behind drift router; the second is killed (SIGKILL) a few seconds into the run."""
    load = {"workload": "random", "num_prompts": 60, "request_rate": 4, "input_len": 64, "output_len": 48}
    with agents(3, logs) as ag, router("drift", "least-loaded", ag.urls, logs) as url:
        timer = threading.Timer(args.kill_after, lambda: os.kill(ag.procs[1].pid, signal.SIGKILL))
        timer.start()
        t0 = time.monotonic()
        out = logs / "kill.json"
        cmd = [*DRIFT, "bench", "serve", "--base-url", url, "--tokenizer", tokenizer, "--no-progress",
               "--save-result", str(out), "--save-detailed", "--request-timeout", "120"]  # fmt: skip
        for key, value in load.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=900)
        timer.cancel()
        doc = json.loads(out.read_text())
        run = doc["runs"][0] if "runs" in doc else doc
        reqs = run.get("requests") or []
        ok = sum(1 for r in reqs if r.get("success"))
        errors: dict[str, int] = {}
        for r in reqs:
            if not r.get("success"):
                key = re.sub(r"\d+", "N", (r.get("error") or "?"))[:80]
                errors[key] = errors.get(key, 0) + 1
        row = {"requests": len(reqs), "succeeded": ok, "errors": errors, "wall_s": time.monotonic() - t0}
        print(f"killed agent 1 after {args.kill_after:.0f} s: {ok}/{len(reqs)} succeeded, errors {errors}")
        return row


# ---- 4. the router's own CPU cost ------------------------------------------------------------------------------
FAKE_EVENT = b'data: {"id":"cmpl-x","object":"text_completion","choices":[{"index":0,"text":" a"}]}\n\n'


def serve_fake_upstream(port: int, events: int, interval_s: float) -> None:
    """A fake agent answering at once: `/state` (ready, idle), a small JSON completion, or a stream of `events`
    events `interval_s` apart (each its own write, so the router relays each as its own read)."""
    import asyncio

    from aiohttp import web

    state = {"model": "fake", "ready": True, "draining": False, "engine_up": True, "waiting": 0, "running": 0,
             "pending_prefill_tokens": 0, "kv_blocks_total": 1000, "kv_blocks_free": 1000, "kv_used_tokens": 0,
             "block_size": 16, "perf": {}, "slo": {"attainment": None}}  # fmt: skip
    body = json.dumps({"id": "cmpl-x", "object": "text_completion", "model": "fake",
                       "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}).encode()  # fmt: skip

    async def get_state(_: web.Request) -> web.Response:
        return web.json_response(state)

    async def generate(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=body, content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for _ in range(events):
            await out.write(FAKE_EVENT)
            await asyncio.sleep(interval_s)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_get("/state", get_state)
    app.router.add_post("/v1/completions", generate)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux `/proc/PID/stat`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def router_cpu(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Router CPU per non-streaming request and per relayed stream event, against a fake upstream in its own
    process; the load generator is this process (aiohttp), so neither's CPU is counted."""
    import asyncio

    import aiohttp

    events = args.cpu_stream_events
    up_port = free_port()
    up_log = open(logs / "fake-upstream.log", "w")  # noqa: SIM115 - closed with the process
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve-fake-upstream", str(up_port), "--cpu-stream-events", str(events),
         "--cpu-event-interval-ms", str(args.cpu_event_interval_ms)],
        stdout=up_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(f"http://{HOST}:{up_port}", upstream, "/state", timeout_s=60)
        with router("drift", "prefix-affinity", [f"http://{HOST}:{up_port}"], logs) as url:
            pid = _router_pids[url]

            async def requests(n: int, concurrency: int, stream: bool) -> int:
                """n requests, `concurrency` at a time; returns the stream events received."""
                got = 0
                sem = asyncio.Semaphore(concurrency)
                conn = aiohttp.TCPConnector(limit=0)
                payload = {"model": "fake", "prompt": "hello", "max_tokens": 8, "stream": stream}
                async with aiohttp.ClientSession(connector=conn) as session:

                    async def one(i: int) -> None:
                        nonlocal got
                        async with (
                            sem,
                            session.post(
                                url + "/v1/completions", json=payload, headers={"x-session-id": str(i % 64)}
                            ) as r,
                        ):
                            assert r.status == 200, await r.text()
                            if stream:
                                async for line in r.content:
                                    got += line.startswith(b"data: {")
                            else:
                                await r.read()

                    await asyncio.gather(*(one(i) for i in range(n)))
                return got

            def measure(fn: Any) -> tuple[float, float, Any]:
                c0, t0 = cpu_seconds(pid), time.monotonic()
                out = fn()
                return cpu_seconds(pid) - c0, time.monotonic() - t0, out

            asyncio.run(requests(500, 32, False))  # warm-up: connections, allocator
            idle_cpu, idle_wall, _ = measure(lambda: time.sleep(5.0))
            idle_rate = idle_cpu / idle_wall  # polling /state, timers
            n = args.cpu_requests
            cpu, wall, _ = measure(lambda: asyncio.run(requests(n, 64, False)))
            per_request = (cpu - idle_rate * wall) / n
            streams = args.cpu_streams
            cpu_s, wall_s, got = measure(lambda: asyncio.run(requests(streams, streams, True)))
            assert got == streams * events, f"received {got} of {streams * events} events"
            # A stream's own setup costs about a request; the rest is per relayed event.
            per_event = (cpu_s - idle_rate * wall_s - streams * per_request) / got

            async def latencies(target: str, n: int, stream: bool) -> list[float]:
                """One request at a time: seconds to the whole body, or streaming to the first event."""
                out = []
                payload = {"model": "fake", "prompt": "hello", "max_tokens": 8, "stream": stream}
                async with aiohttp.ClientSession() as session:
                    for _ in range(n):
                        t = time.perf_counter()
                        async with session.post(target + "/v1/completions", json=payload) as r:
                            if stream:
                                async for line in r.content:
                                    if line.startswith(b"data: {"):
                                        break
                            else:
                                await r.read()
                        out.append(time.perf_counter() - t)
                return out

            # The latency the router adds, with nothing else in the path to vary: direct and through the
            # router in alternating blocks (A B B A ...), so a drift of the machine falls on both alike.
            direct = f"http://{HOST}:{up_port}"
            added: dict[bool, dict[str, list[float]]] = {
                False: {"direct": [], "router": []},
                True: {"direct": [], "router": []},
            }
            for stream in (False, True):
                for block in range(8):
                    order = ("direct", "router") if block % 2 == 0 else ("router", "direct")
                    for name in order:
                        added[stream][name] += asyncio.run(
                            latencies(direct if name == "direct" else url, 100, stream)
                        )
    finally:
        stop(upstream)
    row = {
        "per_request_ms": 1000 * per_request,
        "requests": n,
        "requests_per_s": n / wall,
        "per_event_us": 1e6 * per_event,
        "streams": streams,
        "events": got,
        "events_per_s": got / wall_s,
        "idle_cpu_fraction": idle_rate,
    }
    for stream, key in ((False, "request"), (True, "first_event")):
        d, r = (statistics.median(added[stream][n]) * 1000 for n in ("direct", "router"))
        row[f"p50_{key}_direct_ms"], row[f"p50_{key}_router_ms"], row[f"added_{key}_ms"] = d, r, r - d
    print(
        f"router CPU: {row['per_request_ms']:.3f} ms per non-streaming request ({n} at {n / wall:.0f}/s), "
        f"{row['per_event_us']:.1f} µs per relayed event ({streams} concurrent streams, {got} events at "
        f"{got / wall_s:.0f}/s); idle {100 * idle_rate:.1f}% of a core",
        flush=True,
    )
    print(
        f"router latency, one request at a time (P50 of 800 each): non-streaming {row['p50_request_direct_ms']:.3f}"
        f" ms direct, {row['p50_request_router_ms']:.3f} ms through the router (+{row['added_request_ms']:.3f});"
        f" streaming, to the first event: {row['p50_first_event_direct_ms']:.3f} ms direct, "
        f"{row['p50_first_event_router_ms']:.3f} ms through the router (+{row['added_first_event_ms']:.3f})",
        flush=True,
    )
    return row


# ---- 5. the simulator on the same workload ---------------------------------------------------------------------
def simulate(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    """`drift sim run` with part 1's count, rate, lengths, turns, think time, seed and SLO, per policy."""
    rows = []
    for policy in args.drift_policies:
        out = logs / f"sim-{policy}.json"
        cmd = [*DRIFT, "sim", "run", "--instances", str(args.agents), "--router", policy,
               "--workload", "multi-turn", "--num-prompts", str(args.num_prompts),
               "--request-rate", str(args.request_rate), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--mean-turns", str(args.mean_turns),
               "--think-time", str(args.think_time), "--seed", str(args.seed), "--prefix-caching",
               "--slo", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}", "--save-result", str(out),
               *args.sim_args]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        run = json.loads(out.read_text())["runs"][0]
        row = {
            "router": policy,
            "hit_rate": run.get("sim_stats", {}).get("prefix_cache_hit_rate"),
            "mean_ttft_ms": run["summary"].get("mean_ttft_ms"),
            "slo_attainment": run["summary"].get("slo_attainment"),
        }
        rows.append(row)
        print(
            f"sim {policy:<18} hit {100 * (row['hit_rate'] or 0):5.1f}%  mean TTFT {row['mean_ttft_ms']:.1f} ms"
            f"  SLO {100 * (row['slo_attainment'] or 0):.1f}%",
            flush=True,
        )
    return rows


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(result: dict[str, Any]) -> None:
    """The tables of docs/benchmarks.md's Routing section, from this run."""
    if "policies" in result:
        print("\n| router | prefix-cache hit rate | mean TTFT ms | P50 TTFT ms | P50 TPOT ms | SLO attainment "
              "| requests per agent |\n| --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
        for r in result["policies"]:
            per_agent = " / ".join(f"{v:.0f}" for v in r["per_agent"])
            print(f"| {r['router']} | {pct(r['hit_rate'])} | {ms(r['mean_ttft_ms'])} | {ms(r['p50_ttft_ms'])} | "
                  f"{ms(r['p50_tpot_ms'])} | {pct(r['slo_attainment'])} | {per_agent} |")  # fmt: skip
    if "overhead" in result:
        print("\n| load | path | P50 TTFT ms (spread) | P50 TPOT ms (spread) |\n| --- | --- | --- | --- |")
        for r in result["overhead"]:
            print(f"| {r['load']} | {r['path']} | {r['p50_ttft_ms']:.1f} ({r['p50_ttft_spread_ms']:.1f}) | "
                  f"{r['p50_tpot_ms']:.1f} ({r['p50_tpot_spread_ms']:.1f}) |")  # fmt: skip
    if "sim" in result:
        print("\n| router | simulated hit rate | simulated mean TTFT ms | simulated SLO attainment |\n"
              "| --- | --- | --- | --- |")  # fmt: skip
        for r in result["sim"]:
            print(
                f"| {r['router']} | {pct(r['hit_rate'])} | {r['mean_ttft_ms']:.1f} | {pct(r['slo_attainment'])} |"
            )
    if "cpu" in result:
        c = result["cpu"]
        print(f"\nrouter CPU: {c['per_request_ms']:.2f} ms per non-streaming request, {c['per_event_us']:.0f} µs "
              f"per relayed event at {c['streams']} concurrent streams")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--request-rate", type=float, default=1.5)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--mean-turns", type=float, default=4.0)
    p.add_argument("--think-time", type=float, default=1.0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-after", type=float, default=6.0)
    p.add_argument(
        "--drift-policies",
        nargs="+",
        default=["prefix-affinity", "slo-aware", "least-loaded", "round-robin", "random"],
    )
    p.add_argument("--overhead-repeats", type=int, default=3, help="A B C C B A rounds per load")
    p.add_argument("--cpu-requests", type=int, default=20000, help="non-streaming requests of the CPU part")
    p.add_argument("--cpu-streams", type=int, default=300, help="concurrent streams of the CPU part")
    p.add_argument("--cpu-stream-events", type=int, default=200, help="events per stream of the CPU part")
    p.add_argument("--cpu-event-interval-ms", type=float, default=10.0, help="the fake upstream's event gap")
    p.add_argument(
        "--sim-args",
        nargs="*",
        default=[],
        help="extra `drift sim run` arguments of the sim part, e.g. --profile F.json (after `--`)",
    )
    p.add_argument("--serve-fake-upstream", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["policies", "overhead", "kill", "cpu", "sim"], nargs="+", default=None)
    p.add_argument("--save-result", type=Path, default=None)
    args = p.parse_args()
    if args.serve_fake_upstream is not None:
        serve_fake_upstream(
            args.serve_fake_upstream, args.cpu_stream_events, args.cpu_event_interval_ms / 1000
        )
        return

    from drift_agent.models.embedded import embedded_model_dir

    tokenizer = str(embedded_model_dir())
    parts = args.only or ["policies", "overhead", "kill", "cpu", "sim"]
    with tempfile.TemporaryDirectory(prefix="drift-bench-router-") as tmp:
        logs = Path(tmp)
        result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "save_result"}}
        if "policies" in parts:
            result["policies"] = policies(args, tokenizer, logs)
        if "overhead" in parts:
            result["overhead"] = overhead(args, tokenizer, logs)
        if "kill" in parts:
            result["kill"] = kill_one(args, tokenizer, logs)
        if "cpu" in parts:
            result["cpu"] = router_cpu(args, logs)
        if "sim" in parts:
            result["sim"] = simulate(args, logs)
    markdown(result)
    if args.save_result:
        args.save_result.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

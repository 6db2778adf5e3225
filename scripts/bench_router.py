"""`drift router` against the alternatives, on real processes on loopback, in one run.

    python scripts/bench_router.py [--agents 3] [--num-prompts 48] [--request-rate 1.5] [--save-result F.json]

Three measurements, each printed as a table (figures for docs/benchmarks.md):

1. Routing policies on a multi-turn workload (`drift bench serve --workload multi-turn`): fresh agents for each
   router, so every run starts with cold prefix caches; the prefix-cache hit rate summed over the agents
   (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`), mean and P50 TTFT, P50 TPOT and SLO attainment, for
   `drift router` with prefix-affinity, slo-aware, least-loaded, round-robin and random (what a Kubernetes
   Service's kube-proxy does), and for `vllm-router --policy cache_aware` when it is installed (the peer).
2. Overhead: the same light load straight to one agent and through each router: P50 TTFT and TPOT.
3. An agent killed in the middle of a run: every request completes or fails with an error, none hangs.

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
        cmd = [exe, "--host", HOST, "--port", str(port), "--policy", policy, "--worker-urls", *backends,
               "--log-level", "warning"]  # fmt: skip
        ready = "/health"
    log = open(logs / f"router-{kind}-{policy}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, proc, ready, timeout_s=120)
        yield url
    finally:
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
    """Light load (one request at a time), one agent: straight, through drift router, through vllm-router,
    in the order A B C C B A so a drift of the machine's speed during the run falls on every path alike."""
    load = {"workload": "random", "num_prompts": 40, "input_len": 128, "output_len": 32, "max_concurrency": 1}
    with agents(1, logs) as ag:
        bench(ag.urls[0], tokenizer, logs / "warm.json", args, **load)  # warm caches and allocator
        routers: dict[str, contextlib.AbstractContextManager[str]] = {
            "drift router": router("drift", "round-robin", ag.urls, logs)
        }
        if shutil.which("vllm-router"):
            routers["vllm-router"] = router("vllm-router", "round_robin", ag.urls, logs)
        with contextlib.ExitStack() as stack:
            urls = {"direct": ag.urls[0]} | {name: stack.enter_context(ctx) for name, ctx in routers.items()}
            order = list(urls) + list(reversed(urls))
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in urls}
            for i, name in enumerate(order):
                s = bench(urls[name], tokenizer, logs / f"overhead-{i}.json", args, **load)
                figures[name].append((s["median_ttft_ms"], s["median_tpot_ms"]))
    rows = []
    for name, runs in figures.items():
        ttft = sum(r[0] for r in runs) / len(runs)
        tpot = sum(r[1] for r in runs) / len(runs)
        rows.append({"path": name, "p50_ttft_ms": ttft, "p50_tpot_ms": tpot, "runs": runs})
        print(f"{name:<14} P50 TTFT {ttft:.2f} ms  P50 TPOT {tpot:.2f} ms  (runs: {runs})", flush=True)
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
    p.add_argument("--only", choices=["policies", "overhead", "kill"], nargs="+", default=None)
    p.add_argument("--save-result", type=Path, default=None)
    args = p.parse_args()

    from drift_agent.models.embedded import embedded_model_dir

    tokenizer = str(embedded_model_dir())
    parts = args.only or ["policies", "overhead", "kill"]
    with tempfile.TemporaryDirectory(prefix="drift-bench-router-") as tmp:
        logs = Path(tmp)
        result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "save_result"}}
        if "policies" in parts:
            result["policies"] = policies(args, tokenizer, logs)
        if "overhead" in parts:
            result["overhead"] = overhead(args, tokenizer, logs)
        if "kill" in parts:
            result["kill"] = kill_one(args, tokenizer, logs)
    if args.save_result:
        args.save_result.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

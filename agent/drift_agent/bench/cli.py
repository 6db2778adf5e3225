"""`drift bench serve` (load generator) and `drift bench plot` (overlay result files).

Wiring: the top-level CLI creates the `bench` parser and its subparsers, then calls `add_serve_parser(subs)` and
`add_plot_parser(subs)` (and its own `offline`). Exit codes: 0 done, 1 server unreachable or rejecting the probe,
2 bad arguments or input files (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from collections import Counter
from typing import Any
from urllib.parse import urlparse

from ..argtypes import non_negative_float, non_negative_int, percentiles, positive_int, rate, rates
from . import BenchError, ServerUnreachableError
from .console import format_rate, make_console
from .metrics import goodput_item
from .workloads import WORKLOADS

DEFAULT_PERCENTILES = "50,90,99"


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="benchmark an OpenAI-compatible server (ours, vLLM, SGLang) for latency, throughput and goodput",
        description="Stream a workload to /v1/completions or /v1/chat/completions at precomputed arrival times "
        "and report TTFT/TPOT/ITL/E2E percentiles, throughput, goodput and SLO attainment (vLLM definitions).",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000"
    )
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    g.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)"
    )
    g.add_argument("--request-timeout", type=rate, default=600.0, help="seconds between stream chunks")
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly the target output length (ignore_eos + min_tokens); default on",
    )
    g.add_argument(
        "--temperature", type=non_negative_float, default=None, help="sampling temperature to send"
    )
    g.add_argument(
        "--extra-body", type=_json_object, default={}, help="JSON object merged into every request body"
    )

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random")
    w.add_argument("--dataset-path", default=None, help="the file of the jsonl workload")
    w.add_argument(
        "--num-prompts", type=positive_int, default=1000, help="requests per run (turns, for sessions)"
    )
    w.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer dir or tokenizer.json for exact prompt lengths (default: word prompts)",
    )
    w.add_argument("--input-len", type=positive_int, default=None, help="random/long-context input tokens")
    w.add_argument(
        "--output-len", type=positive_int, default=None, help="target output tokens (fixes it for all)"
    )
    w.add_argument(
        "--range-ratio", type=non_negative_float, default=None, help="random/long-context spread in [0,1)"
    )
    w.add_argument(
        "--prefix-len", type=non_negative_int, default=0, help="tokens of a prefix shared by all prompts"
    )
    w.add_argument(
        "--mean-turns",
        type=rate,
        default=4.0,
        help="multi-turn: mean turns per session; inf: every session runs to 16 turns or the token cap",
    )
    w.add_argument(
        "--think-time", type=non_negative_float, default=2.0, help="multi-turn: mean think time (s)"
    )
    w.add_argument("--max-session-tokens", type=positive_int, default=8192, help="multi-turn: context cap")
    w.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrival times")

    t = p.add_argument_group("traffic")
    t.add_argument(
        "--request-rate",
        type=rates,
        default=[math.inf],
        help="requests/s, 'inf' (all at t=0), or a comma list to run several rates",
    )
    t.add_argument(
        "--burstiness",
        type=rate,
        default=1.0,
        help="Gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier, >1 smoother, inf evenly spaced",
    )
    t.add_argument("--max-concurrency", type=positive_int, default=None, help="cap on requests in flight")
    t.add_argument("--num-warmups", type=non_negative_int, default=0, help="warm-up requests, excluded")

    m = p.add_argument_group("metrics and sweep")
    m.add_argument(
        "--slo",
        "--goodput",
        nargs="+",
        type=goodput_item,
        default=[],
        metavar="NAME:MS",
        help="SLO targets in ms, e.g. --slo ttft:200 tpot:50 (e2el also accepted)",
    )
    m.add_argument(
        "--percentiles",
        type=percentiles,
        default=percentiles(DEFAULT_PERCENTILES),
        help=f"comma list (default {DEFAULT_PERCENTILES})",
    )
    m.add_argument("--sweep", action="store_true", help="bisect the rate for the max rate meeting the target")
    m.add_argument("--sweep-min", type=rate, default=0.5, help="lowest rate of the sweep (req/s)")
    m.add_argument("--sweep-max", type=rate, default=32.0, help="highest rate of the sweep (req/s)")
    m.add_argument("--sweep-iters", type=non_negative_int, default=6, help="bisection steps after the bounds")
    m.add_argument("--sweep-tolerance", type=rate, default=0.05, help="stop when hi/lo <= 1+this")
    m.add_argument("--target-attainment", type=rate, default=0.9, help="fraction in (0, 1]")

    o = p.add_argument_group("output")
    o.add_argument("--label", default=None, help="name of this run in plots (default model@host)")
    o.add_argument("--save-result", default=None, metavar="F.json", help="write the result document")
    o.add_argument("--save-detailed", action="store_true", help="include per-request records in the result")
    o.add_argument("--plot", default=None, metavar="F.png", help="write the attainment/latency-vs-rate plot")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(func=serve_main)
    return p


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot", help="overlay result files of `drift bench serve` / `drift sim` in one PNG"
    )
    p.add_argument("results", nargs="+", help="result JSON files, one line each")
    p.add_argument("-o", "--output", required=True, metavar="F.png")
    p.add_argument("--title", default=None)
    p.set_defaults(func=plot_main)
    return p


def _err(msg: str) -> None:
    print(f"drift bench: error: {msg}", file=sys.stderr)


def plot_main(args: argparse.Namespace) -> int:
    from .plot import plot_results
    from .results import load_result

    try:
        path = plot_results([load_result(f) for f in args.results], args.output, args.title)
    except BenchError as e:
        _err(str(e))
        return 2
    except OSError as e:
        _err(f"cannot write {args.output}: {e}")
        return 2
    print(f"wrote {path}")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.workload == "jsonl" and not args.dataset_path:
        raise BenchError("--workload jsonl needs --dataset-path")
    if args.dataset_path and args.workload != "jsonl":
        raise BenchError("--dataset-path is only read by --workload jsonl")
    if args.range_ratio is not None and not args.range_ratio < 1:
        raise BenchError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.sweep and not args.slo:
        raise BenchError("--sweep needs --slo (e.g. --slo ttft:200 tpot:50)")
    if args.sweep and not args.sweep_min < args.sweep_max:
        raise BenchError(f"--sweep-min ({args.sweep_min}) must be below --sweep-max ({args.sweep_max})")
    if not 0 < args.target_attainment <= 1:
        raise BenchError(f"--target-attainment must be in (0, 1], got {args.target_attainment}")
    if urlparse(args.base_url).scheme not in ("http", "https") or not urlparse(args.base_url).netloc:
        raise BenchError(f"--base-url must be an http(s) URL, got {args.base_url!r}")


def _workload(args: argparse.Namespace) -> tuple[list[Any], list[Any], Any]:
    """(measured specs, warm-up specs, probe spec). Warm-ups are fresh random prompts of typical length, and
    the start-up probe a short one of its own: sending a measured prompt early would leave its KV blocks in
    the server's prefix cache, so that request would later run warm."""
    import numpy as np

    from .jsonl import load_jsonl
    from .prompts import TokenizerPrompts, WordPrompts, load_tokenizer
    from .workloads import WorkloadParams, generate

    builder: Any = WordPrompts()
    if args.tokenizer:
        try:
            builder = TokenizerPrompts(load_tokenizer(args.tokenizer))
        except Exception as e:  # transformers raises many types for a bad path; all mean the same to the user
            raise BenchError(f"cannot load tokenizer {args.tokenizer!r}: {type(e).__name__}: {e}") from e
    params = WorkloadParams(
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        mean_turns=args.mean_turns,
        think_time_s=args.think_time,
        max_session_tokens=args.max_session_tokens,
    )
    try:
        if args.workload == "jsonl":
            specs = load_jsonl(args.dataset_path, args.num_prompts, args.output_len or 128, builder)
        else:
            specs = generate(args.workload, args.num_prompts, args.seed, params, builder)
    except ValueError as e:
        raise BenchError(str(e)) from e
    warmups = []
    if args.num_warmups:
        typical = WorkloadParams(
            input_len=max(1, int(np.median([s.new_prompt_len for s in specs]))),
            output_len=max(1, int(np.median([s.output_len for s in specs]))),
        )
        warmups = generate("random", args.num_warmups, args.seed + 1_000_003, typical, builder, id_prefix="w")
    probe = generate(
        "random", 1, args.seed + 2_000_003, WorkloadParams(input_len=16, output_len=4), builder, "probe"
    )[0]
    return specs, warmups, probe


def _print_summary(console: Any, title: str, s: dict[str, Any], percentiles: list[float]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    rows = [
        ("Successful / failed requests", f"{s['completed']} / {s['failed']}"),
        ("Benchmark duration (s)", fmt(s["duration_s"])),
        ("Total input / generated tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"),
        ("Request throughput (req/s)", fmt(s["request_throughput"])),
        ("Output token throughput (tok/s)", fmt(s["output_throughput"])),
        ("Total token throughput (tok/s)", fmt(s["total_token_throughput"])),
        (
            "Peak output tok/s / concurrency",
            f"{fmt(s['max_output_tokens_per_s'])} / {s['max_concurrent_requests']}",
        ),
    ]
    if "slo_attainment" in s:
        rows += [
            ("Request goodput (req/s)", fmt(s["request_goodput"])),
            (
                "SLO attainment (%)",
                fmt(100 * s["slo_attainment"]) if s["slo_attainment"] is not None else "-",
            ),
        ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        keys = ["mean", "median"] + [
            f"p{int(p)}" if float(p).is_integer() else f"p{p:g}" for p in percentiles if p != 50
        ]
        rows.append(
            (f"{name.upper()} (ms) " + "/".join(keys), " / ".join(fmt(s.get(f"{k}_{name}_ms")) for k in keys))
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)


async def _serve_async(
    args: argparse.Namespace, specs: list[Any], warmups: list[Any], probe_spec: Any, console: Any, out: Any
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .client import ClientConfig, OpenAIClient
    from .metrics import GoodputTargets
    from .results import make_result
    from .runner import LoadConfig, probe, run_rates, run_sweep, warm_up
    from .sweep import Bisection
    from .workloads import group_sessions

    slo = GoodputTargets.parse(args.slo)
    config = ClientConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model or "",
        ignore_eos=args.ignore_eos,
        slo=slo,
        temperature=args.temperature,
        extra_body=args.extra_body,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        max_connections=args.max_concurrency,
    )
    async with OpenAIClient(config) as client:
        models = await client.list_models()
        if not args.model:
            if not models:
                raise ServerUnreachableError(f"{args.base_url}/v1/models lists no model; pass --model")
            client.config = config = dataclasses.replace(config, model=models[0])
        await probe(client, probe_spec)
        load = LoadConfig(args.burstiness, args.seed, args.max_concurrency, slo, args.percentiles)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=args.no_progress,
            transient=False,
        )
        task: list[Any] = []

        def on_run_start(rate: float, n: int) -> None:
            task[:] = [progress.add_task(f"rate {format_rate(rate)} req/s", total=n)]

        def on_done(_: Any) -> None:
            progress.advance(task[0])

        with progress:
            if warmups:
                task[:] = [progress.add_task("warm-up", total=len(warmups))]
                await warm_up(client, warmups, args.max_concurrency, on_done)
            if args.sweep:
                search = Bisection(
                    args.sweep_min,
                    args.sweep_max,
                    args.target_attainment,
                    args.sweep_iters,
                    args.sweep_tolerance,
                )
                runs, sweep = await run_sweep(client, specs, search, load, on_run_start, on_done)
            else:
                runs, sweep = (
                    await run_rates(client, specs, args.request_rate, load, on_run_start, on_done),
                    None,
                )

    for run in sorted(runs, key=lambda r: r.request_rate):
        title = f"Serving benchmark @ {format_rate(run.request_rate)} req/s"
        _print_summary(out, title, run.summary, args.percentiles)
    errors = Counter(r.error for run in runs for r in run.records if not r.success)
    for error, count in errors.most_common(3):
        console.print(f"[yellow]{count} failed request(s):[/] {error}", markup=True, highlight=False)
    if sweep is not None:
        if sweep.max_rate is None:
            out.print(
                f"No rate in [{format_rate(args.sweep_min)}, {format_rate(args.sweep_max)}] reached "
                f"{100 * args.target_attainment:g}% SLO attainment."
            )
        else:
            bound = "" if sweep.saturated else " (the upper bound itself met it; raise --sweep-max)"
            out.print(
                f"Max rate at {100 * args.target_attainment:g}% SLO attainment: "
                f"{format_rate(sweep.max_rate)} req/s{bound}"
            )
    run_config = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": config.model,
        "workload": args.workload,
        "dataset_path": args.dataset_path,
        "num_prompts": len(specs),
        "num_sessions": len(group_sessions(specs)),
        "tokenizer": args.tokenizer,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "prefix_len": args.prefix_len,
        "mean_turns": args.mean_turns,
        "think_time_s": args.think_time,
        "burstiness": args.burstiness,
        "seed": args.seed,
        "max_concurrency": args.max_concurrency,
        "num_warmups": args.num_warmups,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "slo": slo.as_dict(),
        "percentiles": args.percentiles,
    }
    label = args.label or f"{config.model}@{urlparse(args.base_url).netloc}"
    return make_result(
        label, run_config, [r.to_run(args.save_detailed) for r in runs], sweep.to_dict() if sweep else None
    )


def serve_main(args: argparse.Namespace) -> int:
    from .machine import MachineMonitor
    from .results import save_result

    console, out = make_console(stderr=True), make_console()
    try:
        _check_args(args)
        specs, warmups, probe_spec = _workload(args)
    except BenchError as e:
        _err(str(e))
        return 2
    monitor = MachineMonitor()
    try:
        with monitor:
            result = asyncio.run(_serve_async(args, specs, warmups, probe_spec, console, out))
    except ServerUnreachableError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    if monitor.result is not None:
        result["machine"] = monitor.result.to_dict()
        # The client shares the machine with whatever else runs on it, the server too when it is local.
        warning = monitor.result.warning("the latencies and throughputs")
        if warning:
            print(f"drift bench serve: warning: {warning}", file=sys.stderr)
    try:
        if args.save_result:
            save_result(result, args.save_result)
            console.print(f"wrote {args.save_result}")
        if args.plot:
            from .plot import plot_results

            console.print(f"wrote {plot_results([result], args.plot)}")
    except BenchError as e:
        _err(str(e))
        return 2
    except OSError as e:
        _err(f"cannot write output: {e}")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m drift_agent.bench.cli serve ...`: the bench commands without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="drift bench")
    subs = parser.add_subparsers(dest="bench_command", required=True)
    add_serve_parser(subs)
    add_plot_parser(subs)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

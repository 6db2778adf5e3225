"""`drift sim run`, `drift sim plan` and `drift sim presets`.

Wiring: the top-level CLI calls `add_parser(subparsers)`. Exit codes: 0 done, 1 the simulation could not
finish, 2 bad arguments or input files (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..argtypes import (
    non_negative_float,
    non_negative_int,
    percentiles,
    positive_float,
    positive_int,
    rates,
)
from ..bench.metrics import goodput_item
from ..bench.workloads import WORKLOADS
from ..core.config import POLICIES, PartitionConfig, bounds_text
from ..core.fairness import FAIRNESS
from ..core.preemption import PREEMPTION_MODES
from ..routing.policies import ROUTERS
from .instance import InstanceConfig


class UsageError(Exception):
    """A bad combination of options: printed as one line, exit code 2."""


def _policies(text: str) -> list[str]:
    names = list(POLICIES) if text.strip() == "all" else [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or text!r}; choose from {', '.join(POLICIES)} or 'all'"
        )
    return list(dict.fromkeys(names))


def _disagg(text: str) -> tuple[int, int]:
    p, sep, d = text.partition(":")
    try:
        pair = (int(p), int(d))
    except ValueError:
        pair = (0, 0)
    if not sep or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"expected PREFILL:DECODE instance counts like 1:3, got {text!r}")
    return pair


# ---- parser ------------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, many_policies: bool) -> None:
    h = p.add_argument_group("hardware and performance model")
    h.add_argument("--model", default="llama-3-8b", help="model preset (see `drift sim presets`)")
    h.add_argument(
        "--device", default="h100", help="GPU preset: h100, h100-pcie, h200, a100, a100-80gb, l40s, ..."
    )
    h.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel GPUs per instance")
    h.add_argument(
        "--profile", default=None, metavar="F.json", help="measured profile (`drift profile`) to use"
    )
    h.add_argument(
        "--profile-model",
        default=None,
        help="model key in the profile file: the identity `drift profile` wrote, e.g. "
        "LlamaForCausalLM:L32-H4096-A32-KV8-D128-I14336-V128256 (default: its only one)",
    )
    h.add_argument(
        "--model-error",
        type=positive_float,
        default=1.0,
        metavar="FACTOR",
        help="the device takes FACTOR x the latency the performance model predicts (policies still plan "
        "with the model): 1.2 = a model 20%% optimistic about the device; default 1 (exact)",
    )

    e = p.add_argument_group("engine")
    e.add_argument(
        "--policy",
        type=_policies,
        default=["chunked"] if not many_policies else list(POLICIES),
        help="policy, a comma list, or 'all' (prefill-first, chunked, static-split, drift)",
    )
    e.add_argument(
        "--fairness",
        choices=list(FAIRNESS),
        default=InstanceConfig.fairness,
        help="fair scheduling across clients: none (priority, then FCFS) or vtc (virtual token counter); "
        "see --clients",
    )
    e.add_argument(
        "--clients",
        type=positive_int,
        default=1,
        metavar="N",
        help="spread the workload's sessions over N clients (by a hash of the session id) for --fairness; "
        "default 1 (one anonymous client)",
    )
    e.add_argument(
        "--fairness-preempt-gap",
        type=positive_float,
        default=InstanceConfig.fairness_preempt_gap,
        metavar="TOKENS",
        help="vtc: preempt a running request for a waiting one that cannot start when its client was served "
        "this many weighted tokens more",
    )
    e.add_argument(
        "--swap-space-gb",
        type=non_negative_float,
        default=InstanceConfig.swap_space_gb,
        metavar="GIB",
        help="host KV tier per GPU (swap preemption, and a host prefix cache of the blocks the GPU lets go); "
        "copies cost time over the device's host link; default 0 (none)",
    )
    e.add_argument(
        "--preemption-mode",
        choices=list(PREEMPTION_MODES),
        default=InstanceConfig.preemption_mode,
        help="a preempted request's KV: recompute later, swap to the host tier and back, or auto (per "
        "request, the cheaper by the model); without --swap-space-gb every mode recomputes",
    )
    e.add_argument(
        "--host-bandwidth",
        type=positive_float,
        default=None,
        metavar="GB/S",
        help="host link per GPU, one way (default: the device's PCIe figure, e.g. 64 for Gen5 x16); the "
        "copies reach 80%% of it",
    )
    e.add_argument(
        "--host-prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the host tier also keeps the cached blocks the GPU lets go and serves prefix hits from them "
        "(default); --no-host-prefix-cache: it holds swapped-out requests only (simulator only)",
    )
    e.add_argument("--block-size", type=positive_int, default=16)
    e.add_argument(
        "--num-kv-blocks", type=positive_int, default=None, help="KV pool size (default: from GPU memory)"
    )
    e.add_argument("--gpu-memory-utilization", type=positive_float, default=0.9)
    e.add_argument("--max-num-seqs", type=positive_int, default=InstanceConfig.max_num_seqs)
    e.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=InstanceConfig.max_num_batched_tokens,
        help="chunk size / token budget",
    )
    e.add_argument("--max-model-len", type=positive_int, default=32768)
    e.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for multi-turn or --prefix-len workloads, off otherwise (faster)",
    )
    e.add_argument(
        "--prefill-sm-share",
        type=positive_float,
        default=InstanceConfig.prefill_sm_share,
        help="static-split's prefill SM share",
    )
    e.add_argument(
        "--fold-max-tokens",
        type=non_negative_int,
        default=InstanceConfig.fold_max_tokens,
        help="drift: most prompt tokens folded into one decode step that meets TPOT (0: never)",
    )
    e.add_argument(
        "--tpot-margin",
        type=float,
        default=InstanceConfig.tpot_margin,
        help="drift: decode plans against TPOT step budget / (1 + margin), "
        f"{bounds_text(PartitionConfig.model_fields['tpot_margin'])}; > 0 keeps decode on more SMs (defends "
        "TPOT), < 0 gives prefill more (favours TTFT); what the operator steers",
    )
    e.add_argument(
        "--no-fast-forward",
        action="store_true",
        help="step every decode step through the scheduler (slower; results are identical)",
    )

    c = p.add_argument_group("cluster")
    c.add_argument("--router", choices=ROUTERS, default="least-loaded")
    c.add_argument("--kv-bandwidth", type=positive_float, default=25.0, help="GB/s per GPU for KV transfers")
    c.add_argument("--migration", action="store_true", help="Llumnix-style live migration between instances")
    c.add_argument("--migration-high", type=positive_float, default=0.9, help="source load to migrate from")
    c.add_argument(
        "--migration-low", type=non_negative_float, default=0.6, help="destination load to migrate to"
    )

    w = p.add_argument_group("workload (as `drift bench serve`)")
    w.add_argument("--workload", choices=WORKLOADS, default="random")
    w.add_argument("--dataset-path", default=None, help="the file of the jsonl workload")
    w.add_argument(
        "--num-prompts", type=positive_int, default=1000, help="requests per run (turns, for sessions)"
    )
    w.add_argument("--input-len", type=positive_int, default=None)
    w.add_argument("--output-len", type=positive_int, default=None)
    w.add_argument("--range-ratio", type=non_negative_float, default=None)
    w.add_argument("--prefix-len", type=non_negative_int, default=0)
    w.add_argument("--mean-turns", type=positive_float, default=4.0)
    w.add_argument("--think-time", type=non_negative_float, default=2.0)
    w.add_argument("--max-session-tokens", type=positive_int, default=8192)
    w.add_argument("--seed", type=int, default=0)

    t = p.add_argument_group("traffic and metrics")
    t.add_argument("--burstiness", type=positive_float, default=1.0, help="Gamma shape: 1 Poisson")
    t.add_argument("--max-concurrency", type=positive_int, default=None)
    t.add_argument(
        "--slo",
        "--goodput",
        nargs="+",
        type=goodput_item,
        default=[],
        metavar="NAME:MS",
        help="e.g. ttft:1000 tpot:50",
    )
    t.add_argument("--percentiles", type=percentiles, default=[50.0, 90.0, 99.0])
    t.add_argument("--target-attainment", type=positive_float, default=0.9)


def add_parser(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="simulate Drift instances and clusters on a virtual clock "
        "(policies, dispatch, capacity planning)",
        description="Discrete-event simulation: the engine's own scheduler and policies, step latencies from "
        "the performance model (a measured profile or a built-in roofline of a preset model and GPU).",
    )
    subs = sim.add_subparsers(dest="sim_command", metavar="{run,plan,presets}")
    sim.set_defaults(func=lambda args: (sim.print_help(), 2)[1])

    run = subs.add_parser("run", help="simulate a workload at one or more rates, or sweep for the max rate")
    _common(run, many_policies=False)
    g = run.add_argument_group("instances, rates and output")
    g.add_argument("--instances", type=positive_int, default=1, help="colocated instances behind --router")
    g.add_argument(
        "--disagg", type=_disagg, default=None, metavar="P:D", help="DistServe layout: P prefill, D decode"
    )
    g.add_argument("--request-rate", type=rates, default=[math.inf], help="req/s, 'inf', or a comma list")
    g.add_argument(
        "--sweep", action="store_true", help="bisect for the max rate meeting the target attainment"
    )
    g.add_argument("--sweep-min", type=positive_float, default=0.5)
    g.add_argument("--sweep-max", type=positive_float, default=64.0)
    g.add_argument("--sweep-iters", type=non_negative_int, default=6)
    g.add_argument("--sweep-tolerance", type=positive_float, default=0.05)
    g.add_argument("--label", default=None, help="label in plots (one policy); default 'sim POLICY (layout)'")
    g.add_argument(
        "--save-result", default=None, metavar="F.json", help="result document (F.POLICY.json per policy)"
    )
    g.add_argument("--save-detailed", action="store_true", help="include per-request records")
    g.add_argument(
        "--plot", default=None, metavar="F.png", help="attainment/latency-vs-rate plot of all policies"
    )
    run.set_defaults(func=run_main)

    pl = subs.add_parser("plan", help="fewest replicas/GPUs and the policy meeting the SLO at a rate")
    _common(pl, many_policies=True)
    g = pl.add_argument_group("planning")
    # The same flag as `drift sim run` and `drift bench serve` (one finite rate here); --rate is the old name.
    g.add_argument(
        "--request-rate",
        "--rate",
        dest="rate",
        type=positive_float,
        required=True,
        metavar="RATE",
        help="request rate to serve (req/s)",
    )
    g.add_argument("--max-replicas", type=positive_int, default=16)
    g.add_argument("--disagg", action="store_true", help="also search disaggregated P:D layouts")
    g.add_argument("--save-result", default=None, metavar="F.json", help="write the plan as JSON")
    pl.set_defaults(func=plan_main)

    pr = subs.add_parser("presets", help="list the built-in model and GPU presets")
    pr.set_defaults(func=presets_main)


# ---- commands ----------------------------------------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"drift sim: error: {msg}", file=sys.stderr)


def _check(args: argparse.Namespace) -> None:
    if args.workload == "jsonl" and not args.dataset_path:
        raise UsageError("--workload jsonl needs --dataset-path")
    if args.dataset_path and args.workload != "jsonl":
        raise UsageError("--dataset-path is only read by --workload jsonl")
    if args.range_ratio is not None and not args.range_ratio < 1:
        raise UsageError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if not 0 < args.target_attainment <= 1:
        raise UsageError(f"--target-attainment must be in (0, 1], got {args.target_attainment}")
    if not 0 < args.prefill_sm_share < 1:
        raise UsageError(f"--prefill-sm-share must be in (0, 1), got {args.prefill_sm_share}")
    if not args.migration_low < args.migration_high:
        raise UsageError("--migration-low must be below --migration-high")


def _specs(args: argparse.Namespace) -> list[Any]:
    from ..bench.prompts import WordPrompts
    from ..bench.workloads import WorkloadParams, generate

    params = WorkloadParams(
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        mean_turns=args.mean_turns,
        think_time_s=args.think_time,
        max_session_tokens=args.max_session_tokens,
    )
    if args.workload == "jsonl":
        from ..bench.jsonl import load_jsonl

        return load_jsonl(args.dataset_path, args.num_prompts, args.output_len or 128, WordPrompts())
    return generate(args.workload, args.num_prompts, args.seed, params)


def _setup(args: argparse.Namespace, specs: list[Any]) -> Any:
    from .cluster import ClusterConfig
    from .migration import MigrationConfig
    from .runner import SimSetup

    caching = args.prefix_caching
    if caching is None:
        caching = args.prefix_len > 0 or any(s.turn > 0 for s in specs)
    slo = _slo(args)
    cluster = ClusterConfig(
        instances=getattr(args, "instances", 1),
        router=args.router,
        disaggregated=args.disagg if isinstance(args.disagg, tuple) else None,
        kv_bandwidth=args.kv_bandwidth * 1e9,
        migration=MigrationConfig(args.migration_high, args.migration_low) if args.migration else None,
        clients=args.clients,
    )
    setup = SimSetup.build(
        args.model,
        args.device,
        args.tp,
        profile_path=args.profile,
        profile_model=args.profile_model,
        policy=args.policy[0],
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=caching,
        prefill_sm_share=args.prefill_sm_share,
        fold_max_tokens=args.fold_max_tokens,
        tpot_margin=args.tpot_margin,
        model_error=args.model_error,
        slo_ttft_ms=slo.ttft_ms or InstanceConfig.slo_ttft_ms,
        slo_tpot_ms=slo.tpot_ms or InstanceConfig.slo_tpot_ms,
        fairness=args.fairness,
        fairness_preempt_gap=args.fairness_preempt_gap,
        swap_space_gb=args.swap_space_gb,
        preemption_mode=args.preemption_mode,
        host_bw=args.host_bandwidth * 1e9 if args.host_bandwidth is not None else None,
        host_prefix_cache=args.host_prefix_cache,
        cluster=cluster,
    )
    return setup.with_instance(fast_forward=not args.no_fast_forward)


def _slo(args: argparse.Namespace) -> Any:
    from ..bench.metrics import GoodputTargets

    return GoodputTargets.parse(args.slo)


def _load(args: argparse.Namespace) -> Any:
    from .runner import LoadSpec

    return LoadSpec(
        burstiness=args.burstiness,
        seed=args.seed,
        slo=_slo(args),
        percentiles=tuple(args.percentiles),
        prefix_len=args.prefix_len,
        max_concurrency=args.max_concurrency,
    )


def _workload_config(args: argparse.Namespace, specs: list[Any]) -> dict[str, Any]:
    from ..bench.workloads import group_sessions

    return {
        "workload": args.workload,
        "dataset_path": args.dataset_path,
        "num_prompts": len(specs),
        "num_sessions": len(group_sessions(specs)),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "prefix_len": args.prefix_len,
        "mean_turns": args.mean_turns,
        "think_time_s": args.think_time,
    }


def _fmt(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _tier_line(stats: dict[str, Any]) -> str:
    """Preemptions and the host tier's traffic of one run, where there were any."""
    parts = []
    if stats.get("preemptions"):
        parts.append(
            f"{stats['preemptions']} preemptions ({stats['swap_preemptions']} swapped, "
            f"{stats['fairness_preemptions']} for fairness), {stats['recomputed_tokens']} tokens recomputed"
        )
    tier = stats.get("host_tier")
    if tier:
        out, inn = tier["copies_out"], tier["copies_in"]
        run = tier["mean_copy_run_blocks"]
        parts.append(
            f"host tier: {tier['prefix_host_hit_tokens']} prefix-hit tokens, "
            f"{(out['bytes'] + inn['bytes']) / 1e9:.2f} GB copied in {out['copy_s'] + inn['copy_s']:.3f} s"
            + (f" ({run:.1f} blocks a copy)" if run else "")
        )
    return "".join(f"; {p}" for p in parts)


def run_main(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..bench import BenchError
    from ..bench.console import format_rate, make_console
    from ..bench.results import save_result
    from ..bench.sweep import Bisection
    from .cluster import SimulationError
    from .runner import result_document, simulate_rate, simulate_sweep

    out, err = make_console(), make_console(stderr=True)
    try:
        _check(args)
        if args.sweep and not args.slo:
            raise UsageError("--sweep needs --slo (e.g. --slo ttft:1000 tpot:50)")
        if args.sweep and not args.sweep_min < args.sweep_max:
            raise UsageError("--sweep-min must be below --sweep-max")
        if args.label and len(args.policy) > 1:
            raise UsageError("--label names one run; with several policies the labels are 'sim POLICY (...)'")
        specs = _specs(args)
        base = _setup(args, specs)
    except (UsageError, ValueError, BenchError) as e:
        _err(str(e))
        return 2
    load = _load(args)
    docs = []
    # The title goes on its own line: as the table's title it would wrap to the table's width.
    title = f"Simulated: {base.hardware_label}, perf model: {base.perf_source}"
    table = Table()
    for col in (
        "policy",
        "rate",
        "attainment %",
        "goodput req/s",
        "P90 TTFT ms",
        "P90 TPOT ms",
        "P99 ITL ms",
        "throughput req/s",
    ):
        table.add_column(col, justify="right" if col != "policy" else "left", overflow="fold")
    total_requests, total_wall = 0, 0.0
    sweeps: dict[str, Any] = {}
    wall0 = time.perf_counter()
    try:
        for policy in args.policy:
            setup = base.with_policy(policy)
            if args.sweep:
                search = Bisection(
                    args.sweep_min,
                    args.sweep_max,
                    args.target_attainment,
                    args.sweep_iters,
                    args.sweep_tolerance,
                )
                points, sweep = simulate_sweep(setup, specs, search, load)
                sweeps[policy] = sweep
            else:
                points, sweep = [simulate_rate(setup, specs, r, load) for r in args.request_rate], None
            for p in points:
                att = p.summary.get("slo_attainment")
                err.print(
                    f"  {policy} @ {format_rate(p.rate)} req/s: {len(p.run.records)} requests simulated in "
                    f"{p.run.wall_s:.2f} s"
                    + (f", SLO attainment {100 * att:.1f}%" if att is not None else "")
                    + _tier_line(p.run.stats),
                    highlight=False,
                )
            for p in sorted(points, key=lambda p: p.rate):
                s = p.summary
                total_requests += len(p.run.records)
                total_wall += p.run.wall_s
                table.add_row(
                    policy,
                    format_rate(p.rate),
                    _fmt(s.get("slo_attainment"), 100, 1),
                    _fmt(s.get("request_goodput")),
                    _fmt(s.get("p90_ttft_ms"), digits=1),
                    _fmt(s.get("p90_tpot_ms"), digits=1),
                    _fmt(s.get("p99_itl_ms"), digits=1),
                    _fmt(s.get("request_throughput")),
                )
            docs.append(
                result_document(
                    setup, points, sweep, _workload_config(args, specs), load, args.label, args.save_detailed
                )
            )
    except SimulationError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    out.print(title, highlight=False)
    out.print(table)
    for policy, sweep in sweeps.items():
        if sweep.max_rate is None:
            out.print(
                f"{policy}: no rate in [{format_rate(args.sweep_min)}, {format_rate(args.sweep_max)}] "
                f"reached {100 * args.target_attainment:g}% SLO attainment"
            )
        else:
            bound = "" if sweep.saturated else " (the upper bound itself met it; raise --sweep-max)"
            out.print(
                f"{policy}: max rate at {100 * args.target_attainment:g}% SLO attainment "
                f"{format_rate(sweep.max_rate)} req/s{bound}"
            )
    rpm = 60.0 * total_requests / total_wall if total_wall > 0 else math.inf
    err.print(
        f"simulated {total_requests} requests in {total_wall:.2f} s of simulation "
        f"({time.perf_counter() - wall0:.2f} s with metrics): {rpm:,.0f} simulated requests/min"
    )
    try:
        if args.save_result:
            path = Path(args.save_result)
            for doc, policy in zip(docs, args.policy, strict=True):
                target = (
                    path
                    if len(docs) == 1
                    else path.with_name(f"{path.stem}.{policy}{path.suffix or '.json'}")
                )
                save_result(doc, target)
                err.print(f"wrote {target}")
        if args.plot:
            from ..bench.plot import plot_results

            err.print(f"wrote {plot_results(docs, args.plot, base.hardware_label)}")
    except BenchError as e:
        _err(str(e))
        return 2
    except OSError as e:
        _err(f"cannot write output: {e}")
        return 2
    return 0


def plan_main(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from ..bench import BenchError
    from ..bench.console import format_rate, make_console
    from .cluster import SimulationError
    from .plan import PlanPoint, plan

    out, err = make_console(), make_console(stderr=True)
    try:
        _check(args)
        if not args.slo:
            raise UsageError("plan needs --slo (e.g. --slo ttft:1000 tpot:50)")
        if args.disagg and args.migration:
            raise UsageError("--migration applies to colocated instances, not to --disagg layouts")
        specs = _specs(args)
        base = _setup(args, specs)
    except (UsageError, ValueError, BenchError) as e:
        _err(str(e))
        return 2

    def progress(p: PlanPoint) -> None:
        mark = "meets" if p.met else "misses"
        err.print(
            f"  {p.policy:14s} {p.layout:14s} {p.replicas:3d} replica(s): "
            f"{100 * p.attainment:5.1f}% attainment, {mark} the target"
        )

    wall0 = time.perf_counter()
    try:
        result = plan(
            base,
            specs,
            args.rate,
            _load(args),
            args.policy,
            target=args.target_attainment,
            max_replicas=args.max_replicas,
            disaggregated=args.disagg,
            on_point=progress,
        )
    except SimulationError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    title = (
        f"Plan for {format_rate(args.rate)} req/s, SLO {' '.join(args.slo)}, "
        f"{100 * args.target_attainment:g}% attainment ({base.hardware_label})"
    )
    table = Table()
    for col in (
        "policy",
        "layout",
        "replicas",
        "GPUs",
        "attainment %",
        "goodput req/s",
        "P99 TTFT ms",
        "P99 TPOT ms",
    ):
        table.add_column(col, justify="left" if col in ("policy", "layout") else "right", overflow="fold")
    shown = {(p.policy, p.layout.split()[0]) for p in result.best_per_config()}
    for p in result.best_per_config():
        table.add_row(
            p.policy,
            p.layout,
            str(p.replicas),
            str(p.gpus),
            _fmt(p.attainment, 100, 1),
            _fmt(p.goodput),
            _fmt(p.p99_ttft_ms, digits=0),
            _fmt(p.p99_tpot_ms, digits=1),
        )
    for policy in dict.fromkeys(p.policy for p in result.points):
        for kind in dict.fromkeys(p.layout.split()[0] for p in result.points if p.policy == policy):
            if (policy, kind) not in shown:
                table.add_row(policy, kind, "-", "-", "not met", "-", "-", "-")
    out.print(title, highlight=False)
    out.print(table)
    best = result.best
    if best is None:
        out.print(f"No configuration up to {args.max_replicas} replicas meets the target.")
    else:
        out.print(
            f"Fewest GPUs: {best.gpus} ({best.replicas} x TP{args.tp} {best.layout}) "
            f"with policy {best.policy}"
        )
    err.print(f"{len(result.points)} simulations in {time.perf_counter() - wall0:.1f} s")
    if args.save_result:
        try:
            Path(args.save_result).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            _err(f"cannot write {args.save_result}: {e}")
            return 2
    return 0


def presets_main(args: argparse.Namespace) -> int:
    from .presets import GPU_MEMORY, MODEL_PRESETS, device_preset

    print("Model presets (shapes from each checkpoint's config.json):")
    for p in MODEL_PRESETS.values():
        m = p.shape
        params = (m.num_layers * m.layer_params + 2 * m.vocab_size * m.hidden_size) / 1e9
        print(
            f"  {p.name:14s} {p.hf_id:30s} {params:5.1f}B params, {m.num_layers} layers, "
            f"hidden {m.hidden_size}, "
            f"heads {m.num_heads}/{m.num_kv_heads} KV, MLP {m.intermediate_size}, vocab {m.vocab_size}, "
            f"{m.kv_bytes_per_token // 1024} KiB of KV per token"
        )
    print("GPU presets (datasheets; --device takes any unambiguous part of the name):")
    for name, (mem, link) in GPU_MEMORY.items():
        spec = device_preset(name)
        print(
            f"  {name:24s} {spec.sms} SMs, {spec.peak_flops / 1e12:g} TFLOP/s BF16, "
            f"{spec.mem_bw / 1e12:g} TB/s, "
            f"{mem / 1e9:g} GB, GPU link {link / 1e9:g} GB/s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m drift_agent.sim.cli run ...` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="drift")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

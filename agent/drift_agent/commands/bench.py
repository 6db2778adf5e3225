"""`drift bench offline` (engine vs transformers) and `drift bench serve` (load against any OpenAI server)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .engine_args import add_engine_args, config_or_exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    p = bsub.add_parser(
        "offline",
        help="offline throughput: Drift's engine vs transformers' batched generate",
        description="The same random-token prompts and output lengths through Drift's engine and through "
        "transformers' batched generate, one after the other on this machine; prints output tok/s and their "
        "ratio, and warns when other work on the machine made the ratio meaningless.",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=32,
        metavar="N",
        help="requests in the workload (default: %(default)s)",
    )
    p.add_argument(
        "--input-len",
        type=int,
        nargs=2,
        default=[16, 192],
        metavar=("MIN", "MAX"),
        help="prompt tokens, uniform in [MIN, MAX] (default: 16 192)",
    )
    p.add_argument(
        "--output-len",
        type=int,
        nargs=2,
        default=[8, 96],
        metavar=("MIN", "MAX"),
        help="output tokens, uniform in [MIN, MAX], generated exactly (default: 8 96)",
    )
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="transformers' static batch size (default: %(default)s)",
    )
    p.add_argument(
        "--workload-seed", type=int, default=0, help="seed of prompts and lengths (default: %(default)s)"
    )
    p.add_argument(
        "--skip-transformers",
        action="store_true",
        help="only measure Drift (default: measure both and print the ratio)",
    )
    p.add_argument(
        "--served",
        action="store_true",
        help="instead of transformers, run the same work through a real `drift serve` (a subprocess on a free "
        "loopback port, HTTP streaming, every request at once) and print engine and served output tok/s and "
        "their ratio: the cost of the HTTP/streaming layer (default: off)",
    )
    p.add_argument(
        "--save-result", metavar="F.json", help="write the figures as JSON here (default: not saved)"
    )
    add_engine_args(p)
    p.set_defaults(func=run_offline)

    from ..bench.cli import add_plot_parser, add_serve_parser

    add_serve_parser(bsub)
    add_plot_parser(bsub)


def run_offline(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "hf_batch_size"):
        if getattr(args, name) < 1:
            print(f"drift bench offline: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not (1 <= args.input_len[0] <= args.input_len[1] and 1 <= args.output_len[0] <= args.output_len[1]):
        print("drift bench offline: length ranges must satisfy 1 <= MIN <= MAX", file=sys.stderr)
        return 2
    config = config_or_exit_code(args, "bench offline")
    if isinstance(config, int):
        return config
    import torch

    from ..bench.machine import MachineMonitor
    from ..bench.offline import (
        compare,
        compare_served,
        make_workload,
        run_drift,
        run_served,
        run_transformers,
    )
    from ..bench.results import json_safe
    from ..engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    special = set(engine.tokenizer.all_special_ids)
    vocab = [i for i in range(min(engine.runner.model.vocab_size, len(engine.tokenizer))) if i not in special]
    wl = make_workload(
        vocab, args.num_prompts, tuple(args.input_len), tuple(args.output_len), args.workload_seed
    )
    print(
        f"workload: {args.num_prompts} prompts, {wl.num_prompt_tokens} prompt tokens, "
        f"{wl.num_output_tokens} output tokens; torch threads={torch.get_num_threads()}"
    )
    warm = make_workload(vocab, 4, (8, 16), (4, 8), 1)
    run_drift(engine, warm)
    with contextlib.ExitStack() as stack:
        served_at = None
        if args.served:
            from ..bench.offline import serve_subprocess

            # Started (model loaded, warmed up) before anything is timed; idle while the engine runs alone.
            served_at = stack.enter_context(serve_subprocess(config))
            run_served(*served_at, warm)
        # Both measurements inside one window: a busy spell during either one skews the ratio. Served, the
        # server's event loop and the HTTP client are two more runnable threads of this benchmark itself.
        monitor = MachineMonitor(cpus=(os.cpu_count() or 1) + 1 if args.served else None)
        with monitor:
            drift = run_drift(engine, wl)
            print(f"drift        : {drift.seconds:8.2f} s  {drift.output_tokens_per_s:9.1f} output tok/s")
            result: dict = {"drift": drift.output_tokens_per_s}
            if served_at is not None:
                served = run_served(*served_at, wl)
                print(
                    f"served (HTTP): {served.seconds:8.2f} s  {served.output_tokens_per_s:9.1f} output tok/s"
                    f"  (CPU s: server {served.server_cpu_s:.2f}, of which event loop {served.loop_cpu_s:.2f}; "
                    f"benchmark client {served.client_cpu_s:.2f})"
                )
                result = compare_served(drift, served)
                print(f"ratio (served / engine, output tok/s): {result['ratio_served_to_engine']:.2f}")
                if torch.get_num_threads() >= (os.cpu_count() or 1):
                    print(
                        "drift bench offline: note: the torch threads fill every core, so the engine alone "
                        "profits from OpenMP spin-waiting on cores the served run shares with its event loop "
                        "and client; measure the HTTP layer with --num-threads below the core count",
                        file=sys.stderr,
                    )
            elif not args.skip_transformers:
                from transformers import AutoModelForCausalLM

                hf_model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).eval()
                pad = engine.tokenizer.pad_token_id
                pad = pad if pad is not None else next(iter(engine.eos_token_ids))
                hf = run_transformers(hf_model, pad, wl, args.hf_batch_size)
                print(f"transformers : {hf.seconds:8.2f} s  {hf.output_tokens_per_s:9.1f} output tok/s")
                result = compare(drift, hf)
                print(
                    f"ratio (drift / transformers, output tok/s): {result['ratio_output_tokens_per_s']:.2f}x"
                )
    load = monitor.result
    only_drift = args.skip_transformers and not args.served
    warning = load.warning("the throughputs" if only_drift else "the ratio") if load else None
    if warning:
        print(f"drift bench offline: warning: {warning}", file=sys.stderr)
    if args.save_result:
        doc = result | {
            "machine": load.to_dict() if load else None,
            "args": {k: v for k, v in vars(args).items() if k != "func"},
        }
        with open(args.save_result, "w") as f:
            json.dump(json_safe(doc), f, indent=2, allow_nan=False)
    return 0

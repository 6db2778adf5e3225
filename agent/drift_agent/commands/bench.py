"""`drift bench offline` (engine vs transformers) and `drift bench serve` (load against any OpenAI server)."""

from __future__ import annotations

import argparse
import json
import sys

from .engine_args import add_engine_args, config_or_exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    p = bsub.add_parser(
        "offline", help="offline throughput: Drift's engine vs transformers' batched generate"
    )
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 192], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 96], metavar=("MIN", "MAX"))
    p.add_argument("--hf-batch-size", type=int, default=16, help="transformers' static batch size")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true", help="only measure Drift")
    p.add_argument("--save-result", help="write the figures as JSON here")
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

    from ..bench.offline import compare, make_workload, run_drift, run_transformers
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
    run_drift(engine, make_workload(vocab, 4, (8, 16), (4, 8), 1))  # warm-up
    drift = run_drift(engine, wl)
    print(f"drift        : {drift.seconds:8.2f} s  {drift.output_tokens_per_s:9.1f} output tok/s")
    result: dict = {"drift": drift.output_tokens_per_s}
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).eval()
        pad = engine.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(engine.eos_token_ids))
        hf = run_transformers(hf_model, pad, wl, args.hf_batch_size)
        print(f"transformers : {hf.seconds:8.2f} s  {hf.output_tokens_per_s:9.1f} output tok/s")
        result = compare(drift, hf)
        print(f"ratio (drift / transformers, output tok/s): {result['ratio_output_tokens_per_s']:.2f}x")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result | {"args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2)
    return 0

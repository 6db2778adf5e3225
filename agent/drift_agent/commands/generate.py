"""`drift generate "prompt"`: one-shot generation with the engine (the embedded model by default)."""

from __future__ import annotations

import argparse

from .engine_args import add_engine_args, config_or_exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a completion for a prompt",
        description="Load the engine in this process, generate, print each completion on its own line.",
    )
    p.add_argument("prompt", nargs="+", help="prompt text (several: generated as one batch)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        metavar="N",
        help="most tokens to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default: %(default)s)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k likeliest tokens; 0: all (default: %(default)s)",
    )
    p.add_argument(
        "--sample-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="per-request sampling seed, for reproducible sampling (default: unseeded)",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as is, without the chat template (default: templated when the model has one)",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_or_exit_code(args, "generate")
    if isinstance(config, int):
        return config
    from ..core.sampling_params import SamplingParams
    from ..engine.llm_engine import LLMEngine

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sample_seed,
    )
    engine = LLMEngine(config)
    prompts = list(args.prompt)
    if not args.raw and getattr(engine.tokenizer, "chat_template", None):
        prompts = [
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    for out in engine.generate(prompts, params):
        print(out.text.strip())
    return 0

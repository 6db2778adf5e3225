"""Engine options shared by every command that builds an engine (`generate`, `serve`, `bench offline`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.config import POLICIES, EngineConfig
from ..core.errors import DriftError
from ..core.fairness import FAIRNESS
from ..core.preemption import PREEMPTION_MODES


class PreflightError(DriftError):
    """A configuration that is valid on paper but cannot run here (no GPU, port in use...)."""


def engine_default(name: str) -> Any:
    """The built-in default of an EngineConfig field, for help texts (flags default to None so that YAML and
    DRIFT_* values keep their precedence; the help shows what applies when nothing sets the option)."""
    return EngineConfig.model_fields[name].get_default(call_default_factory=True)


def _with_default(text: str, name: str) -> str:
    value = engine_default(name)
    shown = value if not isinstance(value, bool) else ("on" if value else "off")
    return f"{text} (default: {shown})".replace("%", "%%")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "engine", "Precedence: flags > DRIFT_* environment variables > --config YAML > the defaults shown."
    )
    g.add_argument(
        "--model",
        metavar="DIR",
        help="local Hugging Face model directory, or a Hugging Face id (org/name) already in the local "
        "Hugging Face cache, never downloaded (default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR_OR_ID",
        help="tokenizer directory or cached Hugging Face id (default: the model's own)",
    )
    g.add_argument(
        "--generation-config",
        metavar="auto|vllm|DIR",
        help=_with_default(
            "default temperature, top_p, top_k, min_p and repetition_penalty of requests that leave them "
            "unset, and max_new_tokens as a cap on max_tokens: auto reads the model's "
            "generation_config.json, vllm ignores it, DIR reads DIR/generation_config.json",
            "generation_config",
        ),
    )
    g.add_argument(
        "--max-logprobs",
        type=int,
        metavar="N",
        help=_with_default(
            "most logprobs (completions) or top_logprobs (chat) a request may ask for, -1 for no limit; "
            "more is a 400",
            "max_logprobs",
        ),
    )
    g.add_argument(
        "--config",
        dest="config_file",
        metavar="YAML",
        help="YAML file of engine options, any EngineConfig key (sample: docs/engine.yaml) (default: none)",
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=_with_default("weights and KV cache dtype; auto: float32 on CPU, bfloat16 on GPU", "dtype"),
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help=_with_default("where to run; auto: cuda when a GPU is visible, else cpu", "device"),
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        metavar="TOKENS",
        help="context window (prompt + output tokens); above the model's limit is an error "
        "(default: the model's max_position_embeddings)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        metavar="TOKENS",
        help=_with_default("tokens per KV cache block", "block_size"),
    )
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        metavar="N",
        help="fixed KV pool size in blocks, overriding the memory budget (default: sized from the budget)",
    )
    g.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        metavar="GIB",
        help="KV cache budget in GiB (default: 2 on CPU; on GPU what --gpu-memory-utilization leaves)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        metavar="FRACTION",
        help=_with_default(
            "fraction of GPU memory for weights, activations and KV cache", "gpu_memory_utilization"
        ),
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        metavar="N",
        help=_with_default("most sequences running in one step", "max_num_seqs"),
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="TOKENS",
        help=_with_default("token budget of one step (the prefill chunk size)", "max_num_batched_tokens"),
    )
    g.add_argument(
        "--policy",
        choices=list(POLICIES),
        help=_with_default(
            "scheduling policy: prefill-first, chunked (chunked prefill), static-split (fixed SM split), "
            "drift (SLO-aware PD multiplexing)",
            "policy",
        ),
    )
    g.add_argument(
        "--fairness",
        choices=list(FAIRNESS),
        help=_with_default(
            "fair scheduling across clients (x-client-id header, or the API key): none (priority, then "
            "FCFS) or vtc (the least-served client first, by a virtual token counter)",
            "fairness",
        ),
    )
    g.add_argument(
        "--fairness-preempt-gap",
        type=float,
        metavar="TOKENS",
        help=_with_default(
            "vtc: preempt a running request for a waiting one that cannot start when its client was served "
            "this many weighted tokens more (prompt tokens count 1, output tokens 2)",
            "fairness_preempt_gap",
        ),
    )
    g.add_argument(
        "--swap-space-gb",
        type=float,
        metavar="GIB",
        help=_with_default(
            "host-memory KV tier (pinned on CUDA): keeps the cached blocks the KV pool lets go, for prefix "
            "hits by copy instead of recompute, and the KV of swapped-out requests; 0: none",
            "swap_space_gb",
        ),
    )
    g.add_argument(
        "--preemption-mode",
        choices=list(PREEMPTION_MODES),
        help=_with_default(
            "a preempted request's KV: recompute it later, swap it to the host tier and back, or auto (per "
            "request, whichever is cheaper by the measured copy and prefill rates); swap needs "
            "--swap-space-gb",
            "preemption_mode",
        ),
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV blocks of shared prompt prefixes (default: prefix caching on)",
    )
    g.add_argument(
        "--attention-backend",
        choices=["auto", "sdpa", "flash-attn", "flashinfer", "triton", "flex"],
        help=_with_default(
            "attention kernels; auto: flash-attn, then flashinfer, then triton on CUDA in 16 bits, else sdpa",
            "attention_backend",
        ),
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="never replay decode steps from CUDA graphs (default: graphs on CUDA with the triton backend)",
    )
    g.add_argument(
        "--num-threads",
        type=int,
        metavar="N",
        help="torch intra-op threads on CPU (default: torch's, one per core)",
    )
    g.add_argument(
        "--seed",
        type=int,
        help=_with_default(
            "accepted for vLLM compatibility; unused (a request's own seed makes it reproducible)", "seed"
        ),
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """YAML < DRIFT_* env < flags; a bad value raises pydantic's ValidationError (callers report it)."""
    overrides = {
        name: getattr(args, name, None)
        for name in (
            "model",
            "tokenizer",
            "generation_config",
            "max_logprobs",
            "dtype",
            "device",
            "max_model_len",
            "block_size",
            "num_kv_blocks",
            "kv_cache_memory_gb",
            "gpu_memory_utilization",
            "max_num_seqs",
            "max_num_batched_tokens",
            "policy",
            "fairness",
            "fairness_preempt_gap",
            "swap_space_gb",
            "preemption_mode",
            "attention_backend",
            "enforce_eager",
            "num_threads",
            "seed",
        )
    }
    if getattr(args, "no_prefix_caching", False):
        overrides["enable_prefix_caching"] = False
    return EngineConfig.from_sources(getattr(args, "config_file", None), dict(os.environ), **overrides)


def config_error_message(exc: Exception) -> str:
    """One line per invalid field, without pydantic's URLs."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def check_before_loading(config: EngineConfig) -> None:
    """Refuse what would otherwise fail only after the model loads, or deep in a traceback: `--device cuda`
    without a GPU, a missing or unsupported model directory, a context window above the model's limit.
    Raises a `DriftError` whose message is one line."""
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
            raise PreflightError(
                f"device 'cuda' requested but no CUDA GPU is visible{build}; use --device cpu"
            )
    from ..models.loader import (
        load_generation_defaults,
        read_config,
        resolve_max_model_len,
        resolve_model_path,
    )

    if config.tokenizer is not None:
        resolve_model_path(config.tokenizer, "tokenizer")
    if config.generation_config not in ("auto", "vllm"):  # auto needs the model dir: checked at load
        load_generation_defaults(config.generation_config, ".")
    if config.model is not None:
        model_dir = resolve_model_path(config.model)
    else:
        from ..models.embedded import embedded_model_dir, gguf_path

        gguf_path()  # the package is installed; converting it can wait unless its limit is needed now
        if config.max_model_len is None:
            return
        model_dir = embedded_model_dir()
    resolve_max_model_len(read_config(model_dir), config.max_model_len)


def config_or_exit_code(args: argparse.Namespace, command: str) -> EngineConfig | int:
    """The engine config, checked against this machine and the model directory, or exit code 2 after a
    one-line reason on stderr."""
    try:
        config = engine_config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"drift {command}: invalid configuration: {config_error_message(exc)}", file=sys.stderr)
        return 2
    try:
        check_before_loading(config)
    except DriftError as exc:
        print(f"drift {command}: error: {exc}", file=sys.stderr)
        return 2
    return config

"""Engine options shared by every command that builds an engine (`generate`, `serve`, `bench offline`)."""

from __future__ import annotations

import argparse
import os
import sys

from ..engine.config import POLICIES, EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model", help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument("--config", dest="config_file", help="YAML file of engine options")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--num-kv-blocks", type=int)
    g.add_argument("--kv-cache-memory-gb", type=float)
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--policy", choices=list(POLICIES))
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--attention-backend", choices=["auto", "sdpa", "flash-attn", "flashinfer", "flex"])
    g.add_argument("--num-threads", type=int)
    g.add_argument("--seed", type=int)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """YAML < DRIFT_* env < flags; a bad value raises pydantic's ValidationError (callers report it)."""
    overrides = {
        name: getattr(args, name, None)
        for name in (
            "model",
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
            "attention_backend",
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


def config_or_exit_code(args: argparse.Namespace, command: str) -> EngineConfig | int:
    """The engine config, or exit code 2 after a one-line reason on stderr."""
    try:
        return engine_config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"drift {command}: invalid configuration: {config_error_message(exc)}", file=sys.stderr)
        return 2

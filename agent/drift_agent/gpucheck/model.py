"""A random-weight model with real architecture shapes, built without a checkpoint and without a download.

The directory holds only config.json and a word-level tokenizer covering the whole vocabulary (prompts are
token ids, and every sampled id detokenizes); the weights are drawn on the device when the engine loads the
model, so an 8B model costs no 16 GB of safetensors on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Llama-3-8B (Meta-Llama-3-8B config.json): the shapes of the paper's and the simulator's figures.
LLAMA3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
}
# tests/tiny_models.py's tiny Llama: the same code paths in well under a second on a CPU.
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}


def write_model_dir(path: Path, shape: dict[str, Any], name: str) -> Path:
    """config.json (Llama architecture) and a tokenizer whose token i is the word `t{i}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = int(shape["vocab_size"])
    eos = vocab - 1
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": name,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        **shape,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta (kept in `shape`).
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape["rope_theta"])},
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if not (path / "tokenizer.json").exists():
        words = {f"t{i}": i for i in range(vocab)}
        tok = Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}", unk_token="t0")
        fast.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    return path


@contextmanager
def random_weights() -> Iterator[None]:
    """While active, `load_model` fills weights from N(0, 0.02) on the device instead of reading safetensors
    (norms 1): timing needs the shapes, not trained values."""
    import torch

    from ..models import loader

    def fill(model: Any, _model_dir: Any) -> None:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    saved = loader.load_weights
    loader.load_weights = fill
    try:
        yield
    finally:
        loader.load_weights = saved


def build_engine(
    model_dir: Path,
    *,
    dry_run: bool,
    profile_path: Path,
    attention_backend: str = "auto",
    eager: bool = False,
) -> Any:
    """The engine every engine part shares: chunked to start with, prefix caching off (each run's prompts
    must cost their full prefill), the profile path set so the multiplexing policies find part d's profile."""
    from ..core.config import EngineConfig
    from ..engine.llm_engine import LLMEngine

    cfg: dict[str, Any] = dict(
        model=str(model_dir),
        policy="chunked",
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        profile_path=str(profile_path),
        attention_backend=attention_backend,
        enforce_eager=eager,
    )
    if dry_run:
        cfg |= dict(device="cpu", dtype="float32", max_model_len=512, kv_cache_memory_gb=0.05, num_threads=2)
    else:
        cfg |= dict(device="cuda", dtype="bfloat16", max_model_len=8192, gpu_memory_utilization=0.85)
    with random_weights():
        return LLMEngine(EngineConfig(**cfg))

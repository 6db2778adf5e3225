"""Tiny, deterministic Hugging Face model directories for tests (no downloads).

`tiny_model_dir(arch)` builds a random-weight Llama/Qwen2/Qwen3/Mistral checkpoint plus a real byte-level BPE
tokenizer into a per-config cache under the system temp dir, once per machine, and returns the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the builder changes in a way that changes the files it writes.
BUILD_VERSION = 1

ARCHS: tuple[str, ...] = ("llama", "llama3", "qwen2", "qwen3", "mistral")

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system answers many requests at once, and every
request wants its first token soon and the next tokens at a steady pace. Prefill reads the whole prompt;
decode writes one token at a time. The cache keeps keys and values in fixed blocks of memory.
What is the capital of France? The capital of France is Paris. Berlin is the capital of Germany, and
Rome is the capital of Italy. Tokyo is the capital of Japan. Hello, world! How are you today?
Once upon a time there was a small model that liked to count: one, two, three, four, five, six, seven.
Numbers like 1024, 2048 and 3.14159 appear in text too, as do symbols such as #, @, %, & and {braces}.
We met at the café and had a naïve discussion about the façade of the old théâtre in Zürich.
日本語のテキストも少し含めます。東京は日本の首都です。こんにちは、世界！
Emoji are bytes too: 🙂 🚀 ✨ 🐍 — and so are dashes, “quotes” and ellipses…
The scheduler picks which sequences run in each step, and the block manager hands out cache blocks.
Kubernetes runs the pods; the operator watches the custom resources and reconciles the deployments.
"""


def make_tokenizer(dir: Path) -> Path:
    """Train a deterministic byte-level BPE tokenizer into `dir` (tokenizer.json + config); cached per dir."""
    dir = Path(dir)
    if (dir / "tokenizer.json").exists() and (dir / "tokenizer_config.json").exists():
        return dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus gives merges enough counts to be stable; training is deterministic for fixed input.
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dir))
    return dir


def _tiny_config_kwargs(arch: str, vocab_size: int, eos_id: int) -> dict[str, Any]:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.15,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return common
    if arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return {**common, "num_hidden_layers": 3, "tie_word_embeddings": True, "rope_parameters": rope}
    if arch == "qwen2":
        return {**common, "num_hidden_layers": 3, "tie_word_embeddings": True, "max_window_layers": 3}
    if arch == "qwen3":
        # head_dim deliberately != hidden_size // num_heads, as in real Qwen3 checkpoints.
        return {**common, "head_dim": 32, "tie_word_embeddings": True, "max_window_layers": 2}
    if arch == "mistral":
        return {**common, "head_dim": 16, "sliding_window": 24}
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")


def _config_class(arch: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig,
        "llama3": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
    }[arch]


def _randomize(model: Any, seed: int, std: float) -> None:
    """Fill every parameter from one seeded generator: N(0, std) for matrices, biases non-zero, norms ~1.

    HF's own init zeroes biases and sets norms to exactly 1, which would leave those code paths untested.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def make_tiny_model(arch: str, dir: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a random-weight fp32 checkpoint of `arch` with the tiny tokenizer and generation config to `dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dir = Path(dir)
    make_tokenizer(dir)
    tokenizer = AutoTokenizer.from_pretrained(str(dir))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    kwargs = _tiny_config_kwargs(arch, len(tokenizer), eos_id)
    kwargs.update(config_overrides)
    config = _config_class(arch)(**kwargs)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, float(kwargs["initializer_range"]))
    if config.tie_word_embeddings:
        model.tie_weights()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter every test log
    try:
        model.save_pretrained(str(dir), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    ).save_pretrained(str(dir))
    return dir


def _cache_key(arch: str, seed: int, overrides: dict[str, Any]) -> str:
    payload = json.dumps(
        {"v": BUILD_VERSION, "arch": arch, "seed": seed, "overrides": overrides, "corpus": CORPUS},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def tiny_model_dir(arch: str, seed: int = 0, **config_overrides: Any) -> Path:
    """Build (once per machine) and return a cached tiny checkpoint directory for `arch`.

    The build goes to a private temp dir that is renamed into place, so concurrent test processes never see a
    half-written model; a loser of the rename race simply discards its copy.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    root = Path(tempfile.gettempdir()) / "drift-tiny-models"
    target = root / f"{arch}-{_cache_key(arch, seed, config_overrides)}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=root))
    try:
        make_tiny_model(arch, staging, seed=seed, **config_overrides)
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target

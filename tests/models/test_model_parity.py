"""Our paged-KV model against Hugging Face transformers (fp32, eager attention) on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from drift_agent.models.loader import load_model
from tests.models.paged import PagedDriver
from tests.tiny_models import ARCHS, tiny_model_dir

ATOL = 1e-4

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{arch: (arch, {}) for arch in ARCHS},
    "llama-yarn": ("llama", {"rope_parameters": YARN}),
    "llama-linear": ("llama", {"rope_parameters": LINEAR}),
    # Qwen2 with per-layer sliding windows: layer 0 full attention, layers 1-2 a window of 8.
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "mistral-window4": ("mistral", {"sliding_window": 4}),
}


def _dir(variant: str) -> Path:
    arch, overrides = VARIANTS[variant]
    return tiny_model_dir(arch, **overrides)


@pytest.fixture(scope="module")
def hf_models() -> dict[str, torch.nn.Module]:
    return {}


def _hf(variant: str, cache: dict[str, torch.nn.Module]) -> torch.nn.Module:
    if variant not in cache:
        model = AutoModelForCausalLM.from_pretrained(
            str(_dir(variant)), dtype=torch.float32, attn_implementation="eager"
        )
        cache[variant] = model.eval()
    return cache[variant]


def _reference(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_prefill_matches_hf(variant: str, hf_models: dict) -> None:
    model, config = load_model(_dir(variant), "float32", "cpu", attention_backend="sdpa")
    (tokens,) = _prompts(config.vocab_size, (37,))
    logits = PagedDriver(model, num_blocks=16, block_size=4).step_logits([(0, tokens)])
    ref = _reference(_hf(variant, hf_models), tokens)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


# Eager FlexAttention on CPU is slow to plan (seconds); one variant with full and windowed layers covers its
# masks, and it is marked slow (test_attention_backends checks flex against a dense reference quickly).
MIXED_CASES = [(v, "sdpa") for v in VARIANTS] + [
    pytest.param("qwen2-window", "flex", marks=pytest.mark.slow, id="qwen2-window-flex")
]


@pytest.mark.parametrize(("variant", "backend"), MIXED_CASES)
def test_mixed_chunked_prefill_and_decode_match_hf(variant: str, backend: str, hf_models: dict) -> None:
    """Steps mixing chunked prefills (with a cached prefix) and decodes of other sequences, over blocks of 4
    slots handed out in shuffled order, give every token the logits of a full forward in HF."""
    model, config = load_model(_dir(variant), "float32", "cpu", attention_backend=backend)
    a, b, c = _prompts(config.vocab_size, (30, 11, 22), seed=1)
    hf = _hf(variant, hf_models)
    ref = {0: _reference(hf, a), 1: _reference(hf, b), 2: _reference(hf, c)}
    drv = PagedDriver(model, num_blocks=64, block_size=4)
    seqs = {0: a, 1: b, 2: c}
    steps: list[list[tuple[int, int, int]]] = [  # (seq, start, end) per step
        [(0, 0, 13), (2, 0, 5)],
        [(2, 5, 6), (0, 13, 25), (1, 0, 8)],  # a 1-token chunk, a chunk after a prefix, a fresh prefill
        [(0, 25, 26), (1, 8, 9), (2, 6, 7)],  # decode only, unequal context lengths
        [(2, 7, 15), (0, 26, 27), (1, 9, 10)],  # a prefill chunk first, decodes after it
        [(1, 10, 11), (2, 15, 16), (0, 27, 30)],
        *([(2, t, t + 1)] for t in range(16, 22)),
    ]
    for step in steps:
        logits = drv.step_logits([(s, seqs[s][lo:hi]) for s, lo, hi in step])
        row = 0
        for s, lo, hi in step:
            torch.testing.assert_close(logits[row : row + hi - lo], ref[s][lo:hi], atol=ATOL, rtol=0)
            row += hi - lo


@pytest.mark.parametrize("variant", ["mistral-window4", "qwen2-window", "llama"])
def test_batched_decode_of_unequal_lengths_matches_hf(variant: str, hf_models: dict) -> None:
    model, config = load_model(_dir(variant), "float32", "cpu", attention_backend="sdpa")
    prompts = _prompts(config.vocab_size, (9, 17, 6, 12), seed=2)
    hf = _hf(variant, hf_models)
    drv = PagedDriver(model, num_blocks=64, block_size=4)
    drv.step_logits([(i, p[:-4]) for i, p in enumerate(prompts)])
    for k in range(4, 0, -1):
        logits = drv.step_logits([(i, [p[-k]]) for i, p in enumerate(prompts)])
        for i, p in enumerate(prompts):
            upto = len(p) - k + 1
            torch.testing.assert_close(logits[i], _reference(hf, p[:upto])[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["qwen3", "mistral"])
def test_layer_granular_execution_equals_forward(variant: str) -> None:
    model, config = load_model(_dir(variant), "float32", "cpu")
    (tokens,) = _prompts(config.vocab_size, (29,), seed=3)
    first = PagedDriver(model, num_blocks=16, block_size=4)
    ids, pos, attn = first.metadata([(0, tokens)])
    with torch.inference_mode():
        expected = model(ids, pos, attn)
        second = PagedDriver(model, num_blocks=16, block_size=4)
        ids, pos, attn = second.metadata([(0, tokens)])
        plan = model.prepare(pos, attn)
        h, residual = model.embed(ids)
        for start in range(model.num_layers):
            h, residual = model.forward_layers(h, residual, pos, plan, start, start + 1)
        hidden = model.finalize(h, residual)
    torch.testing.assert_close(hidden, expected, atol=0, rtol=0)
    with pytest.raises(ValueError):
        model.forward_layers(h, residual, pos, plan, 0, model.num_layers + 1)


def test_compute_logits_returns_float32_rows() -> None:
    model, config = load_model(_dir("qwen3"), "bfloat16", "cpu")
    (tokens,) = _prompts(config.vocab_size, (10,), seed=4)
    drv = PagedDriver(model, num_blocks=8, block_size=4)
    ids, pos, attn = drv.metadata([(0, tokens)])
    with torch.inference_mode():
        hidden = model(ids, pos, attn)
        logits = model.compute_logits(hidden[[3, 9]])
    assert hidden.dtype == torch.bfloat16 and drv.kv[0][0].dtype == torch.bfloat16
    assert logits.shape == (2, config.vocab_size) and logits.dtype == torch.float32


def test_bfloat16_tracks_float32() -> None:
    fp32, config = load_model(_dir("llama"), "float32", "cpu")
    bf16, _ = load_model(_dir("llama"), "bfloat16", "cpu")
    (tokens,) = _prompts(config.vocab_size, (20,), seed=5)
    ref = PagedDriver(fp32, num_blocks=8, block_size=4).step_logits([(0, tokens)])
    got = PagedDriver(bf16, num_blocks=8, block_size=4).step_logits([(0, tokens)])
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_tied_embeddings_share_storage() -> None:
    tied, _ = load_model(_dir("qwen2"), "float32", "cpu")
    untied, _ = load_model(_dir("llama"), "float32", "cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_model_attributes_size_the_pool() -> None:
    model, config = load_model(_dir("qwen3"), "float32", "cpu")
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (
        config.num_hidden_layers,
        config.num_key_value_heads,
        32,
        config.vocab_size,
    )
    assert model.attention_backend == "sdpa"
    with pytest.raises(ValueError, match="cache pairs"):
        model.bind_kv_cache([])
    bad = torch.zeros(4, 4, model.num_kv_heads, model.head_dim + 1)
    with pytest.raises(ValueError, match="KV cache must be"):
        model.bind_kv_cache([(bad, bad)] * model.num_layers)

"""The CPU fast paths of the model: fused/transposed projections loaded by HF name, oneDNN weights for
decode-sized batches, the unfused RMSNorm for large inputs, and grouping of decode lengths."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drift_agent.models.attention import group_by_length
from drift_agent.models.llama import FusedLinear, RMSNorm
from drift_agent.models.loader import load_model
from drift_agent.models.onednn_linear import ONEDNN_ROWS, OneDnnWeight, onednn_linear_available
from tests.models.paged import PagedDriver
from tests.tiny_models import tiny_model_dir

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="oneDNN linear ops unavailable")


def _checkpoint(arch: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(tiny_model_dir(arch)) / "model.safetensors"))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_fused_projections_hold_the_checkpoint_transposed(arch: str) -> None:
    """q/k/v and gate/up sit side by side, transposed; Qwen2's q/k/v biases and Qwen3's q/k norms load too."""
    model, _ = load_model(tiny_model_dir(arch), "float32", "cpu")
    state = _checkpoint(arch)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    prefix = "model.layers.1."
    q, k, v = (state[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(attn.qkv_proj.weight_t, torch.cat([q, k, v]).t())
    assert torch.equal(attn.o_proj.weight_t, state[f"{prefix}self_attn.o_proj.weight"].t())
    gate, up = state[f"{prefix}mlp.gate_proj.weight"], state[f"{prefix}mlp.up_proj.weight"]
    assert torch.equal(mlp.gate_up_proj.weight_t, torch.cat([gate, up]).t())
    if arch == "qwen2":
        biases = [state[f"{prefix}self_attn.{n}_proj.bias"] for n in "qkv"]
        assert torch.equal(attn.qkv_proj.bias, torch.cat(biases))
        assert attn.o_proj.bias is None
    else:
        assert attn.qkv_proj.bias is None
    if arch == "qwen3":
        assert torch.equal(attn.q_norm.weight, state[f"{prefix}self_attn.q_norm.weight"])
    # Every checkpoint tensor has a target and vice versa (tied heads are skipped on both sides).
    targets = set(model.checkpoint_targets())
    assert targets == set(state) - ({"lm_head.weight"} if model.tie_word_embeddings else set())


def test_fused_linear_matches_separate_linears() -> None:
    gen = torch.Generator().manual_seed(0)
    fused = FusedLinear(6, {"a": 4, "b": 3}, bias=True)
    wa, wb = torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen)
    ba, bb = torch.randn(4, generator=gen), torch.randn(3, generator=gen)
    with torch.no_grad():
        for name, tensor in {"x.a.weight": wa, "x.b.weight": wb, "x.a.bias": ba, "x.b.bias": bb}.items():
            target = fused.checkpoint_targets("x.")[name]
            assert target.shape == tuple(tensor.shape)
            target.dest.copy_(tensor.t() if target.transposed else tensor)
    x = torch.randn(5, 6, generator=gen)
    expected = torch.cat([x @ wa.t() + ba, x @ wb.t() + bb], dim=1)
    torch.testing.assert_close(fused(x), expected)


@needs_onednn
def test_onednn_weight_follows_in_place_updates() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(8, 5, generator=gen))  # [in, out]
    packed = OneDnnWeight(weight, transposed=True)
    x = torch.randn(6, 8, generator=gen)
    torch.testing.assert_close(packed.linear(x, None), x @ weight.detach())
    with torch.no_grad():
        weight.mul_(-2.0)  # as a later load_weights would: the copy must not go stale
    torch.testing.assert_close(packed.linear(x, None), x @ weight.detach())


@needs_onednn
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_onednn_rows_give_the_same_logits_as_sgemm(arch: str) -> None:
    """A decode-sized step (rows within ONEDNN_ROWS) through oneDNN equals the torch.mm path."""
    fast, config = load_model(tiny_model_dir(arch), "float32", "cpu")
    plain, _ = load_model(tiny_model_dir(arch), "float32", "cpu")
    for module in plain.modules():
        if isinstance(module, FusedLinear):
            module.onednn = None
    plain.head_onednn = None
    assert fast.head_onednn is not None
    rows = ONEDNN_ROWS[0] + 3
    tokens = torch.randint(3, config.vocab_size, (rows,), generator=torch.Generator().manual_seed(2)).tolist()
    got = PagedDriver(fast, num_blocks=8, block_size=4).step_logits([(0, tokens)])
    ref = PagedDriver(plain, num_blocks=8, block_size=4).step_logits([(0, tokens)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_onednn_only_for_float32_on_cpu() -> None:
    half, _ = load_model(tiny_model_dir("llama"), "bfloat16", "cpu")
    assert half.head_onednn is None
    assert all(m.onednn is None for m in half.modules() if isinstance(m, FusedLinear))


@pytest.mark.parametrize("shape", [(3, 64), (2048, 64), (700, 4, 32)])
def test_rms_norm_equals_hf_formula(shape: tuple[int, ...]) -> None:
    """Both the fused small-input path and the unfused large-input path compute HF's expression exactly."""
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(shape[-1], generator=gen))
    x = torch.randn(shape, generator=gen)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)


def _cost(groups: list[list[int]], blocks: list[int], cost: int) -> int:
    return sum(cost + len(g) * max(blocks[i] for i in g) for g in groups)


def test_group_by_length_is_an_optimal_partition() -> None:
    rng = random.Random(4)
    for _ in range(60):
        blocks = [rng.randint(1, 30) for _ in range(rng.randint(1, 7))]
        cost = rng.choice([0, 3, 12, 50])
        groups = group_by_length(blocks, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(blocks)))
        maxima = [max(blocks[i] for i in g) for g in groups]
        assert maxima == sorted(maxima, reverse=True)  # longest group first
        order = sorted(range(len(blocks)), key=lambda i: -blocks[i])
        best = min(  # every split of the length-sorted order into runs
            _cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], blocks, cost)
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        assert _cost(groups, blocks, cost) == best


def test_group_by_length_keeps_similar_lengths_together() -> None:
    assert group_by_length([4, 4, 5]) == [[2, 0, 1]]
    assert group_by_length([2, 40, 3, 41]) == [[3, 1], [2, 0]]


def test_group_by_length_stays_cheap_with_many_distinct_lengths() -> None:
    blocks = list(range(1, 400))
    groups = group_by_length(blocks)
    assert sorted(i for g in groups for i in g) == list(range(len(blocks)))
    # Within 10% of attending every context unpadded with no per-call cost at all.
    assert _cost(groups, blocks, 12) < 1.1 * sum(blocks)

"""Paged attention backends against a dense, per-sequence reference; backend resolution and fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from drift_agent.models.attention import (
    SdpaBackend,
    create_backend,
    resolve_backend,
    write_kv,
)
from drift_agent.models.attention_metadata import AttentionMetadata
from tests.models.paged import dense_attention

H, KVH, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 32


def _metadata(qlens: list[int], slens: list[int], seed: int) -> AttentionMetadata:
    """Shuffled block assignment; slot_mapping covers each sequence's last q_len positions."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots = [], []
    for qlen, slen in zip(qlens, slens, strict=True):
        nb = (slen + BS - 1) // BS
        table, perm = perm[:nb], perm[nb:]
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(slen - qlen, slen)]
    width = max(len(t) for t in tables)
    cu = [0]
    for q in qlens:
        cu.append(cu[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
        block_size=BS,
    )


CASES = {
    "decode-uneven": ([1, 1, 1], [5, 13, 1]),
    "prefill-fresh": ([7, 12], [7, 12]),
    "prefill-after-prefix": ([5], [17]),
    "mixed": ([1, 9, 1, 4, 1], [10, 9, 3, 15, 21]),
    # Decode lengths far apart (1-18 blocks): split into length groups, out of row order...
    "decode-groups-scattered": ([1, 1, 1, 1], [3, 70, 2, 5]),
    # ...and in row order (longest first after a prefill chunk), where each group is a slice of rows.
    "decode-groups-sorted": ([6, 1, 1, 1], [6, 70, 5, 3]),
}


# Eager FlexAttention on CPU is slow to plan, so it runs only on the case that mixes every query shape.
BACKEND_CASES = [(case, "sdpa") for case in CASES] + [("mixed", "flex")]


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize(("case", "backend_name"), BACKEND_CASES)
def test_paged_attention_matches_densedense_attention(
    case: str, window: int | None, backend_name: str
) -> None:
    qlens, slens = CASES[case]
    gen = torch.Generator().manual_seed(7)
    attn = _metadata(qlens, slens, seed=3)
    k_cache = torch.zeros(NUM_BLOCKS, BS, KVH, D)
    v_cache = torch.zeros(NUM_BLOCKS, BS, KVH, D)
    keys = [torch.randn(s, KVH, D, generator=gen) for s in slens]
    values = [torch.randn(s, KVH, D, generator=gen) for s in slens]
    # The cached prefix is already in the pool; this step's tokens arrive as k/v and are written by write_kv.
    tables = attn.block_tables.tolist()
    for i, (n, total) in enumerate(zip(qlens, slens, strict=True)):
        for p in range(total - n):
            k_cache[tables[i][p // BS], p % BS] = keys[i][p]
            v_cache[tables[i][p // BS], p % BS] = values[i][p]
    new_k = torch.cat([keys[i][total - n :] for i, (n, total) in enumerate(zip(qlens, slens, strict=True))])
    new_v = torch.cat([values[i][total - n :] for i, (n, total) in enumerate(zip(qlens, slens, strict=True))])
    q = torch.randn(sum(qlens), H, D, generator=gen)
    write_kv(new_k, new_v, k_cache.view(-1, KVH, D), v_cache.view(-1, KVH, D), attn.slot_mapping)

    backend = create_backend(backend_name, "cpu", torch.float32, H, KVH, D)
    plan = backend.plan(attn, {None, 3, 6})
    out = backend.attend(q, new_k, new_v, k_cache, v_cache, plan, window)
    torch.testing.assert_close(out, dense_attention(q, keys, values, qlens, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["decode-groups-scattered", "decode-groups-sorted"])
def test_far_apart_decode_lengths_are_grouped(case: str) -> None:
    qlens, slens = CASES[case]
    plan = SdpaBackend(H, KVH, D, D**-0.5, torch.float32).plan(_metadata(qlens, slens, seed=3), {None})
    sizes = sorted(g.num_seqs for g in plan.decode_groups)
    assert sizes == [1, 2] if case == "decode-groups-sorted" else [1, 3]
    if case == "decode-groups-sorted":
        assert all(isinstance(g.rows, slice) for g in plan.decode_groups)


def test_write_kv_scatters_to_slots() -> None:
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k = torch.arange(6, dtype=torch.float32).view(2, 1, 3)
    write_kv(k, -k, k_cache.view(-1, 1, 3), v_cache.view(-1, 1, 3), torch.tensor([5, 2]))
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(k_cache[1, 0], k[1])
    assert torch.equal(v_cache[2, 1], -k[0]) and k_cache.abs().sum() == k.abs().sum()


@pytest.mark.parametrize("name", ["flash-attn", "flashinfer"])
def test_gpu_backends_fall_back_to_sdpa_on_cpu(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="drift_agent.models.attention"):
        assert resolve_backend(name, "cpu", torch.bfloat16) == "sdpa"
    assert "falling back to sdpa" in caplog.text and name in caplog.text
    assert isinstance(create_backend(name, "cpu", torch.float32, H, KVH, D), SdpaBackend)


def test_resolution_of_auto_sdpa_flex_and_unknown() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    # fp32 on CUDA cannot use flash-attn/flashinfer; auto must not pick them.
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")

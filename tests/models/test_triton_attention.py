"""The Triton paged decode and extend kernels (run by Triton's CPU interpreter) and the `triton` backend
around them, against a dense per-sequence reference: GQA, head sizes, page sizes, ragged lengths, sliding
windows, 16-bit dtypes.

Triton picks the interpreter when it is imported (its own library functions are decorated then), so the kernel
tests run in a child pytest started with TRITON_INTERPRET=1; in this process they skip.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from drift_agent.models.attention import TritonBackend, create_backend, resolve_backend, write_kv
from drift_agent.models.attention_metadata import AttentionMetadata
from drift_agent.models.triton_attention import interpreting, paged_decode, paged_decode_torch, paged_extend
from tests.models.paged import dense_attention

# Set by the parent test for its child: the interpreter was on before anything imported triton.
IN_CHILD = os.environ.get("DRIFT_TRITON_CHILD") == "1" and interpreting()


def _setup(
    qlens: list[int],
    slens: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    page: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[
    AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]
]:
    """A pool with each context's K/V in shuffled pages (this step's rows written by write_kv), tables padded
    one page wider than needed; returns (metadata, q, k_cache, v_cache, keys, values)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // page) for s in slens) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    keys = [torch.randn(s, kv_heads, dim, generator=gen).to(dtype) for s in slens]
    values = [torch.randn(s, kv_heads, dim, generator=gen).to(dtype) for s in slens]
    k_cache = torch.zeros(num_blocks, page, kv_heads, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    tables, slots = [], []
    for i, (n, total) in enumerate(zip(qlens, slens, strict=True)):
        nb = -(-total // page)
        table, perm = perm[:nb], perm[nb:]
        tables.append(table)
        for p in range(total - n):
            k_cache[table[p // page], p % page] = keys[i][p]
            v_cache[table[p // page], p % page] = values[i][p]
        slots += [table[p // page] * page + p % page for p in range(total - n, total)]
    width = max(len(t) for t in tables) + 1
    cu = [0]
    for n in qlens:
        cu.append(cu[-1] + n)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
        block_size=page,
    )
    new_k = torch.cat([keys[i][t - n :] for i, (n, t) in enumerate(zip(qlens, slens, strict=True))])
    new_v = torch.cat([values[i][t - n :] for i, (n, t) in enumerate(zip(qlens, slens, strict=True))])
    write_kv(
        new_k, new_v, k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim), attn.slot_mapping
    )
    q = torch.randn(sum(qlens), heads, dim, generator=gen).to(dtype)
    return attn, q, k_cache, v_cache, keys, values


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (heads, kv heads, head dim, page size, context lengths): GQA 1/2/4/8 per KV head, head dims that are not
# powers of two, pages smaller and larger than the kernel's 32-token tile, lengths of 1 and many tiles.
DECODE_SHAPES = {
    "gqa2-tiny": (4, 2, 8, 4, [5, 13, 1]),
    "gqa4-d64-p16": (8, 2, 64, 16, [100, 3, 40, 17]),
    "mha-d24-p8": (6, 6, 24, 8, [70, 2]),
    "mqa-d80-p64": (8, 1, 80, 64, [130, 64]),
    "gqa8-p1": (16, 2, 16, 1, [9, 33]),
}


@pytest.fixture
def interpret() -> None:
    """Kernels run in Triton's interpreter on CPU tensors: only in the child process."""
    if not IN_CHILD:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_kernels_in_the_interpreter")
    pytest.importorskip("triton")


def test_kernels_in_the_interpreter() -> None:
    if IN_CHILD:
        pytest.skip("this is the child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DRIFT_TRITON_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", __file__]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "failed" not in child.stdout


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_matchesdense_attention(shape: str, window: int | None) -> None:
    heads, kv_heads, dim, page, slens = DECODE_SHAPES[shape]
    attn, q, k_cache, v_cache, keys, values = _setup(
        [1] * len(slens), slens, heads, kv_heads, dim, page, torch.float32
    )
    ref = dense_attention(q, keys, values, attn.query_lens_cpu, window)
    # Three splits: some empty (short sequences), some ending mid-tile.
    out = paged_decode(q, k_cache, v_cache, attn.block_tables, attn.seq_lens, dim**-0.5, window, 3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_half_precision(dtype: torch.dtype) -> None:
    attn, q, k_cache, v_cache, keys, values = _setup([1, 1, 1], [37, 5, 64], 8, 2, 32, 16, dtype)
    out = paged_decode(q, k_cache, v_cache, attn.block_tables, attn.seq_lens, 32**-0.5, None, 1)
    assert out.dtype == dtype
    ref = dense_attention(q, keys, values, attn.query_lens_cpu, None)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


EXTEND_SHAPES = {
    # (query lens, context lens, heads, kv heads, head dim, page): fresh prompts, chunks after a cached
    # prefix, queries longer than a 32-row tile, a single-token query among them.
    "fresh-and-prefix": ([6, 9, 4], [6, 20, 41], 4, 2, 16, 4),
    "long-chunk-gqa4": ([40, 1, 45], [70, 5, 45], 4, 1, 24, 16),
    "mqa-p8": ([33, 12], [33, 100], 8, 1, 32, 8),
}


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("window", [None, 10])
@pytest.mark.parametrize("shape", EXTEND_SHAPES)
def test_extend_kernel_matchesdense_attention(shape: str, window: int | None) -> None:
    qlens, slens, heads, kv_heads, dim, page = EXTEND_SHAPES[shape]
    attn, q, k_cache, v_cache, keys, values = _setup(qlens, slens, heads, kv_heads, dim, page, torch.float32)
    out = torch.full_like(q, float("nan"))
    starts = attn.query_start_loc[:-1].to(torch.int32)
    lens = torch.tensor(qlens, dtype=torch.int32)
    paged_extend(
        q,
        out,
        k_cache,
        v_cache,
        attn.block_tables,
        starts,
        lens,
        attn.seq_lens,
        max(qlens),
        dim**-0.5,
        window,
    )
    torch.testing.assert_close(out, dense_attention(q, keys, values, qlens, window), atol=2e-5, rtol=2e-5)


@pytest.mark.usefixtures("interpret")
def test_extend_kernel_bfloat16() -> None:
    qlens, slens = [20, 7], [50, 7]
    attn, q, k_cache, v_cache, keys, values = _setup(qlens, slens, 8, 2, 32, 16, torch.bfloat16)
    out = torch.empty_like(q)
    starts = attn.query_start_loc[:-1].to(torch.int32)
    lens = torch.tensor(qlens, dtype=torch.int32)
    paged_extend(q, out, k_cache, v_cache, attn.block_tables, starts, lens, attn.seq_lens, 20, 32**-0.5, None)
    ref = dense_attention(q, keys, values, qlens, None)
    torch.testing.assert_close(out.float(), ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


MIXED = {
    # Prefill chunks first, decodes last (the model runner's order): decode rows are a slice.
    "decodes-last": ([6, 9, 1, 1, 1], [6, 20, 41, 7, 1]),
    # Decodes scattered between chunks: their rows are gathered and scattered.
    "interleaved": ([1, 9, 1, 4, 1], [10, 9, 3, 15, 21]),
    "prefill-only": ([5, 12], [17, 12]),
}


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("case", MIXED)
def test_backend_mixed_batches(case: str, use_kernel: bool, request: pytest.FixtureRequest) -> None:
    if use_kernel:
        request.getfixturevalue("interpret")
    qlens, slens = MIXED[case]
    heads, kv_heads, dim, page = 4, 2, 16, 4
    attn, q, k_cache, v_cache, keys, values = _setup(qlens, slens, heads, kv_heads, dim, page, torch.float32)
    backend = TritonBackend(heads, kv_heads, dim, dim**-0.5, torch.float32, use_kernel=use_kernel)
    plan = backend.plan(attn, {None, 3})
    new_k = torch.cat([keys[i][t - n :] for i, (n, t) in enumerate(zip(qlens, slens, strict=True))])
    new_v = torch.cat([values[i][t - n :] for i, (n, t) in enumerate(zip(qlens, slens, strict=True))])
    for window in (None, 3):
        out = backend.attend(q, new_k, new_v, k_cache, v_cache, plan, window)
        torch.testing.assert_close(out, dense_attention(q, keys, values, qlens, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_torch_decode_fallback_matchesdense_attention(window: int | None) -> None:
    slens = [5, 13, 1, 40]
    attn, q, k_cache, v_cache, keys, values = _setup([1] * 4, slens, 8, 2, 16, 4, torch.float32)
    out = paged_decode_torch(q, k_cache, v_cache, attn.block_tables, attn.seq_lens, 16**-0.5, window)
    torch.testing.assert_close(
        out, dense_attention(q, keys, values, attn.query_lens_cpu, window), atol=2e-5, rtol=2e-5
    )


def test_resolution(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if IN_CHILD:
        pytest.skip("the parent runs it")
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"  # CPU behaviour unchanged
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"  # auto keeps fp32 CUDA on sdpa
    with caplog.at_level(logging.WARNING, logger="drift_agent.models.attention"):
        assert resolve_backend("triton", "cpu", torch.float32) == "sdpa"
    assert "triton needs a CUDA device" in caplog.text
    monkeypatch.setattr("drift_agent.models.attention.flash_attn_available", lambda: False)
    monkeypatch.setattr("drift_agent.models.attention.flashinfer_available", lambda: False)
    monkeypatch.setattr("drift_agent.models.attention.triton_available", lambda: True)
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "triton"
    assert resolve_backend("triton", "cuda", torch.float32) == "triton"
    monkeypatch.setattr("drift_agent.models.attention.flashinfer_available", lambda: True)
    assert resolve_backend("auto", "cuda", torch.float16) == "flashinfer"


def test_explicit_triton_runs_on_cpu_under_the_interpreter(interpret: None) -> None:
    assert isinstance(create_backend("triton", "cpu", torch.float32, 4, 2, 8), TritonBackend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_kernel_on_gpu(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set")
    slens = [1, 17, 300, 2048, 63]
    attn, q, k_cache, v_cache, keys, values = _setup([1] * 5, slens, 32, 8, 128, 16, dtype)
    move = [t.cuda() for t in (q, k_cache, v_cache, attn.block_tables, attn.seq_lens)]
    for window in (None, 256):
        out = paged_decode(*move, 128**-0.5, window, 4)
        ref = dense_attention(q, keys, values, attn.query_lens_cpu, window)
        torch.testing.assert_close(out.float().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.usefixtures("interpret")
def test_model_decode_with_the_kernel_matches_sdpa_and_replays() -> None:
    """Tiny Mistral (GQA, sliding window 24): decode logits through the kernel equal sdpa's, eagerly and by
    padded replay over static buffers (the CUDA-graph path with an eager stand-in for the graph)."""
    from drift_agent.engine.cuda_graphs import DecodeGraphs, eager_capture
    from drift_agent.models.loader import load_model
    from tests.models.paged import PagedDriver
    from tests.tiny_models import tiny_model_dir

    ref_model, _ = load_model(tiny_model_dir("mistral"), "float32", "cpu", attention_backend="sdpa")
    model, _ = load_model(tiny_model_dir("mistral"), "float32", "cpu", attention_backend="triton")
    assert model.attention_backend == "triton"
    ref, drv = PagedDriver(ref_model, block_size=4, seed=2), PagedDriver(model, block_size=4, seed=2)
    prompts = {0: list(range(3, 33)), 1: [7, 8, 9], 2: list(range(40, 50))}
    for s, p in prompts.items():
        ref.step_logits([(s, p)])
        drv.step_logits([(s, p)])
    graphs = DecodeGraphs(model, torch.device("cpu"), 4, 4, 16, capture=eager_capture)
    batch = [(0, [11]), (1, [12]), (2, [13])]
    expected = ref.step_logits(batch)
    ids, pos, attn = drv.metadata(batch)
    with torch.inference_mode():
        eager = model.compute_logits(model(ids, pos, attn))
        replayed = model.compute_logits(graphs.run(ids, pos, attn))
    torch.testing.assert_close(eager, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(replayed, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extend_kernel_on_gpu(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set")
    qlens, slens = [300, 1, 77, 512], [300, 40, 1100, 2048]
    attn, q, k_cache, v_cache, keys, values = _setup(qlens, slens, 32, 8, 128, 16, dtype)
    starts = attn.query_start_loc[:-1].to(torch.int32).cuda()
    lens = torch.tensor(qlens, dtype=torch.int32).cuda()
    out = torch.empty_like(q).cuda()
    for window in (None, 256):
        paged_extend(
            q.cuda(), out, k_cache.cuda(), v_cache.cuda(), attn.block_tables.cuda(), starts, lens,
            attn.seq_lens.cuda(), max(qlens), 128**-0.5, window,
        )  # fmt: skip
        ref = dense_attention(q, keys, values, qlens, window)
        torch.testing.assert_close(out.float().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])

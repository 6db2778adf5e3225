"""Triton paged attention, K/V read straight from the paged pool through the block tables.

For CUDA devices without flash-attn or flashinfer. Decode (one query token per sequence) is split-KV
("flash-decoding"): each program attends one (sequence, KV head, split) -- all query heads of that KV head at
once, so GQA reads every K/V row once -- and writes a partial output with its log-sum-exp; a second kernel
merges the splits. Everything the decode kernels read about the batch (lengths, block tables) comes from device
tensors and the launch grid depends only on the batch size, so a decode step is capturable in a CUDA graph.
Extend (prefill chunks, after a cached prefix or not) is a causal flash-attention kernel per (sequence, query
head, 32-query tile) that visits only the key tiles its queries can see (causal, sliding window).

Triton is imported lazily: this module imports without it and without a GPU. With TRITON_INTERPRET=1 the
kernels run on CPU tensors (tests); the interpreter mishandles 16-bit dots, so there operands go to fp32.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Tokens per tile of the KV loop; tiles may span several pages (one block-table read per token).
_BLOCK_N = 32
_MAX_SPLITS = 16
_NO_WINDOW = 1 << 30


def triton_available() -> bool:
    """Whether triton imports (the kernels also need a CUDA device, or TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install raises all kinds of errors
        logger.debug("triton is installed but does not import: %s", exc)
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def num_kv_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence so that about two programs run per SM; a function of the batch size only (a CUDA
    graph bakes the grid in)."""
    if device.type != "cuda":
        return 2  # the interpreter: still exercise the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_MAX_SPLITS, -(-2 * sms // max(1, num_seqs * num_kv_heads))))


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """Define the kernels on first use (keyed by interpret mode: triton picks the interpreter at decoration)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_partial(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        lens_ptr,
        part_ptr,
        lse_ptr,
        scale,
        window,
        stride_qb,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_tb,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr,
        SPLITS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_heads = tl.num_programs(1) * GROUP
        seq_len = tl.load(lens_ptr + b)
        # Query at position seq_len-1 sees keys > seq_len-1-window (HF's sliding-window rule); no window is
        # passed as a huge one.
        start = tl.maximum(seq_len - window, 0)
        per_split = tl.cdiv(tl.cdiv(seq_len - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if FP32_DOT:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + tl.arange(0, BLOCK_N)
            p_ok = pos < hi
            block = tl.load(tables_ptr + b * stride_tb + pos // PAGE, mask=p_ok, other=0)
            slot = block.to(tl.int64) * PAGE + pos % PAGE
            kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            kv_ok = p_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
            if FP32_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            else:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(p_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # An empty split (short sequence) leaves l_i = 0: its lse is -inf and the merge gives it no weight.
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        lse = m_i + tl.log(tl.maximum(l_i, 1e-30))
        row = (b * num_heads + heads) * SPLITS + split
        tl.store(
            part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :]
        )
        tl.store(lse_ptr + row, lse, mask=g_ok)

    @triton.jit
    def _merge_splits(
        part_ptr,
        lse_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        row = b * tl.num_programs(1) + h
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < SPLITS
        d_ok = offs_d < HEAD_DIM
        lse = tl.load(lse_ptr + row * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        weight = tl.exp(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
        part = tl.load(
            part_ptr + (row * SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok
        )

    return _decode_partial, _merge_splits


@functools.lru_cache(maxsize=2)
def _extend_kernel(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_extend(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        row_start_ptr,
        q_len_ptr,
        lens_ptr,
        out_ptr,
        scale,
        window,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_tb,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr,
        FP32_DOT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        tile = tl.program_id(2)
        kvh = h // GROUP
        row0 = tl.load(row_start_ptr + b)
        n = tl.load(q_len_ptr + b)
        seq_len = tl.load(lens_ptr + b)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < n
        d_ok = offs_d < HEAD_DIM
        qpos = seq_len - n + offs_m  # after the cached prefix
        q = tl.load(
            q_ptr + (row0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if FP32_DOT:
            q = q.to(tl.float32)
        # Keys this tile can see: causal up to its last query, window back from its first one.
        hi = tl.minimum(seq_len - n + (tile + 1) * BLOCK_M, seq_len)
        lo = tl.maximum(seq_len - n + tile * BLOCK_M - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # The grid is sized for the longest query: a tile past this sequence's queries loops over nothing.
        hi = tl.where(tile * BLOCK_M < n, hi, lo)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + tl.arange(0, BLOCK_N)
            p_ok = pos < hi
            block = tl.load(tables_ptr + b * stride_tb + pos // PAGE, mask=p_ok, other=0)
            slot = block.to(tl.int64) * PAGE + pos % PAGE
            kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            kv_ok = p_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
            if FP32_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            else:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            seen = p_ok[None, :] & (pos[None, :] <= qpos[:, None]) & (pos[None, :] > qpos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf: shift by 0 instead (exp(-inf) = 0, no NaN).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - shift)
            p = tl.exp(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(
            out_ptr + (row0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )

    return _paged_extend


_BLOCK_M = 32


def paged_extend(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_starts: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int | None,
) -> None:
    """Causal attention of multi-token queries (prefill chunks after any cached prefix) over the pool, their
    own K/V already written. Sequence i's queries are rows row_starts[i] : row_starts[i] + query_lens[i] of
    q [N, H, D], written to the same rows of `out`; block_tables/seq_lens as for paged_decode."""
    heads, head_dim = q.shape[1], q.shape[2]
    _, page, kv_heads, _ = k_cache.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    interpret = interpreting()
    fp32_dot = interpret or q.dtype == torch.float32
    grid = (row_starts.shape[0], heads, -(-max_query_len // _BLOCK_M))
    _extend_kernel(interpret)[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        row_starts,
        query_lens,
        seq_lens,
        out,
        scale,
        _NO_WINDOW if window is None else window,
        q.stride(0),
        q.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=_BLOCK_M,
        BLOCK_D=max(16, _next_pow2(head_dim)),
        BLOCK_N=_BLOCK_N,
        PAGE=page,
        FP32_DOT=fp32_dot,
        PRECISION="ieee" if fp32_dot else "tf32",
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
    splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, H, D] (one token per sequence, its K/V already in the pool) over the pool
    k_cache/v_cache [num_blocks, block_size, KVH, D] through block_tables [>=B, W] and seq_lens [>=B].

    `workspace`: preallocated (partials [B, H, splits, D] fp32, lse [B, H, splits] fp32), shared by the layers
    of one forward. Returns [B, H, D] in q's dtype.
    """
    b, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if workspace is None:
        workspace = decode_workspace(b, heads, head_dim, splits, q.device)
    partials, lse = workspace
    out = q.new_empty(q.shape)
    interpret = interpreting()
    partial_kernel, merge_kernel = _kernels(interpret)
    group = heads // kv_heads
    fp32_dot = interpret or q.dtype == torch.float32
    partial_kernel[(b, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        partials,
        lse,
        scale,
        _NO_WINDOW if window is None else window,
        q.stride(0),
        q.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, _next_pow2(group)),  # tl.dot needs every dimension >= 16
        BLOCK_D=max(16, _next_pow2(head_dim)),
        BLOCK_N=_BLOCK_N,
        PAGE=page,
        SPLITS=splits,
        FP32_DOT=fp32_dot,
        # fp32 inputs would otherwise go through TF32 on tensor cores (10-bit mantissa)
        PRECISION="ieee" if fp32_dot else "tf32",
    )
    merge_kernel[(b, heads)](
        partials,
        lse,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, _next_pow2(head_dim)),
        SPLITS=splits,
        BLOCK_S=max(2, _next_pow2(splits)),
    )
    return out


def decode_workspace(
    num_seqs: int, num_heads: int, head_dim: int, splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    partials = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=device)
    return partials, lse


def paged_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """The same contract in plain torch: a gather of the whole padded table, masked by the device lengths.
    Fixed shapes (no host reads), so it is graph-capturable too; the fallback where triton cannot run."""
    b, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    tables = block_tables[:b].to(torch.int64)
    width = tables.shape[1] * page
    k = k_cache.index_select(0, tables.reshape(-1)).view(b, width, kv_heads, head_dim)
    v = v_cache.index_select(0, tables.reshape(-1)).view(b, width, kv_heads, head_dim)
    lens = seq_lens[:b].to(torch.int64)[:, None]
    pos = torch.arange(width, device=q.device)[None, :]
    keep = pos < lens
    if window is not None:
        keep &= pos >= lens - window
    group = heads // kv_heads
    qg = q.reshape(b, kv_heads, group, head_dim).float()
    scores = torch.einsum("bkgd,btkd->bkgt", qg, k.float()) * scale
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    o = torch.einsum("bkgt,btkd->bkgd", scores.softmax(-1), v.float())
    return o.reshape(b, heads, head_dim).to(q.dtype)

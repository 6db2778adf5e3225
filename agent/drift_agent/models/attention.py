"""Paged attention over Drift's KV pool, with selectable backends.

Every layer first scatters this step's K/V into the pool at `slot_mapping`, then attends over each sequence's
whole context. A backend turns one step's AttentionMetadata into a *plan* once per forward (gather indices,
masks, kernel parameters) that all layers reuse, so per-layer work is only the kernels themselves.

Backends: `sdpa` (any device; torch SDPA over a block-table gather), `flash-attn` and `flashinfer` (CUDA,
fp16/bf16, imported lazily), `triton` (CUDA; Triton kernels reading the paged pool, split-KV decode
capturable in CUDA graphs) and `flex` (torch FlexAttention; compiled on CUDA, eager on CPU).
Query j of a sequence with context length L and n new tokens sits at position L-n+j and attends keys
0..L-n+j, or only the last `window` of them under a sliding window (HF: key > query - window).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from drift_agent.models.attention_metadata import AttentionMetadata
from drift_agent.models.triton_attention import (
    decode_workspace,
    interpreting,
    num_kv_splits,
    paged_decode,
    paged_decode_torch,
    paged_extend,
    triton_available,
)

logger = logging.getLogger(__name__)

BACKEND_NAMES: tuple[str, ...] = ("auto", "sdpa", "flash-attn", "flashinfer", "triton", "flex")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
Window = int | None


def _importable(module: str, attr: str | None = None) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken CUDA extension raises all kinds of errors at import
        logger.debug("%s is installed but does not import: %s", module, exc)
        return False
    return attr is None or hasattr(mod, attr)


def flash_attn_available() -> bool:
    return _importable("flash_attn", "flash_attn_varlen_func")


def flashinfer_available() -> bool:
    return _importable("flashinfer", "BatchPrefillWithPagedKVCacheWrapper")


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Map a requested backend to the one that will actually run on `device` (and `dtype`, if known).

    `auto` picks flash-attn, then flashinfer, then triton, on CUDA with half precision, else sdpa. An explicit
    GPU backend that cannot run here falls back to sdpa with a warning rather than failing the engine. `triton`
    also takes fp32, and runs on CPU under TRITON_INTERPRET=1 (tests).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    on_cuda = torch.device(device).type == "cuda"
    half = dtype is None or dtype in _HALF_DTYPES
    if name in ("sdpa", "flex"):
        return name
    if name == "auto":
        if on_cuda and half and flash_attn_available():
            return "flash-attn"
        if on_cuda and half and flashinfer_available():
            return "flashinfer"
        if on_cuda and half and triton_available():
            return "triton"
        return "sdpa"
    if name == "triton":
        available = triton_available()
        on_cuda = on_cuda or interpreting()
        half = True
    else:
        available = flash_attn_available() if name == "flash-attn" else flashinfer_available()
    reason = None
    if not on_cuda:
        reason = "needs a CUDA device"
    elif not half:
        reason = f"does not support {dtype}"
    elif not available:
        reason = "is not installed or does not import"
    if reason is not None:
        logger.warning("attention backend %s %s; falling back to sdpa", name, reason)
        return "sdpa"
    return name


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new K/V rows [N, kvh, hd] into the flattened pool views [num_blocks*block_size, kvh, hd]."""
    k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive float mask (0 / -inf). SDPA would convert a boolean mask on every call,
    that is once per layer; converting in the plan does it once per step."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _slots(
    block_tables: torch.Tensor, seq_idx: torch.Tensor, pos: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Flat slot of token position `pos` of sequence `seq_idx` (broadcasting), through the block table."""
    blocks = block_tables[seq_idx, torch.div(pos, block_size, rounding_mode="floor")].to(torch.int64)
    return blocks * block_size + pos % block_size


class AttentionBackend:
    """Turns AttentionMetadata into a per-forward plan and runs attention for one layer with it."""

    name = "base"

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.dtype = dtype

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window]) -> Any:
        raise TypeError(f"{type(self).__name__} does not define plan()")

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: Any,
        window: Window,
    ) -> torch.Tensor:
        """q [N, H, D], this step's k/v [N, KVH, D] (already in the pool) -> output [N, H, D]."""
        raise TypeError(f"{type(self).__name__} does not define attend()")


# ----------------------------------------------------------------------------------------------------- sdpa


@dataclass
class _PrefillSeq:
    start: int
    end: int
    # Block ids of the whole context 0..L-1 and L; None when the step holds the whole sequence (fresh k/v).
    blocks: torch.Tensor | None
    total: int
    # Additive [n, L] mask per window; None means plain causal over fresh k/v (is_causal=True).
    masks: dict[Window, torch.Tensor | None]


@dataclass
class _DecodeGroup:
    """Single-token sequences of similar length, attended in one padded SDPA call."""

    rows: slice | torch.Tensor  # their token rows: a slice when they are a run of consecutive rows
    blocks: torch.Tensor  # [Bg * nblk] block ids, row-major (padding repeats block 0, masked out)
    num_seqs: int
    padded_len: int  # nblk * block_size
    masks: dict[Window, torch.Tensor | None]  # additive [Bg, 1, 1, padded_len]; None: nothing masked


@dataclass
class _SdpaPlan:
    num_tokens: int
    decode_groups: list[_DecodeGroup] = field(default_factory=list)
    prefills: list[_PrefillSeq] = field(default_factory=list)


# Fixed cost of one decode group (a K and a V gather, an SDPA call, an output copy), in padded KV blocks of
# work: a group is split off when it saves more padding than this. Calibrated on CPU, where a padded
# block of 16 tokens costs ~5 us per layer and a call ~60 us.
_GROUP_COST_BLOCKS = 12
_GROUP_MAX_LEVELS = 48


def group_by_length(num_blocks: list[int], cost: int = _GROUP_COST_BLOCKS) -> list[list[int]]:
    """Partition sequences (by their context length in blocks) into groups padded to their longest member,
    minimising sum(len(group) * max blocks + cost). Groups are runs of the length-sorted order, so an exact
    dynamic programme over the distinct lengths (longest first) suffices. Returns indices, longest first."""
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    distinct: list[int] = []
    counts: list[int] = []
    for i in order:
        if distinct and distinct[-1] == num_blocks[i]:
            counts[-1] += 1
        else:
            distinct.append(num_blocks[i])
            counts.append(1)
    if len(distinct) > _GROUP_MAX_LEVELS:
        # Bound the quadratic programme (it runs every step): merge runs of adjacent lengths first, each
        # run then padded to its longest member at least.
        step = -(-len(distinct) // _GROUP_MAX_LEVELS)
        distinct = distinct[::step]
        counts = [sum(counts[i : i + step]) for i in range(0, len(counts), step)]
    m = len(distinct)
    # best[i]: cost of grouping distinct[:i]; cut[i]: where the last group of that solution starts.
    best = [0] + [0] * m
    cut = [0] * (m + 1)
    for i in range(1, m + 1):
        members = 0
        best_i, cut_i = None, 0
        for j in range(i - 1, -1, -1):  # last group = distinct[j:i], padded to distinct[j]
            members += counts[j]
            c = best[j] + cost + members * distinct[j]
            if best_i is None or c < best_i:
                best_i, cut_i = c, j
        best[i], cut[i] = best_i, cut_i
    bounds = []
    i = m
    while i > 0:
        bounds.append((cut[i], i))
        i = cut[i]
    groups, pos = [], 0
    for j, i in reversed(bounds):
        size = sum(counts[j:i])
        groups.append(order[pos : pos + size])
        pos += size
    return groups


class SdpaBackend(AttentionBackend):
    """torch SDPA. Single-token sequences are gathered by whole blocks (one contiguous copy per block) into
    padded batches of similar length, one masked SDPA call per batch; longer queries one call each."""

    name = "sdpa"

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window], decodes: bool = True) -> _SdpaPlan:
        """`decodes=False` leaves single-token sequences out (another kernel attends them)."""
        windows = set(windows)
        qlens, slens = attn.query_lens_cpu, attn.seq_lens_cpu
        bs = attn.block_size
        device = attn.block_tables.device
        plan = _SdpaPlan(num_tokens=attn.num_tokens)
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        dec = [i for i, n in enumerate(qlens) if n == 1] if decodes else []
        if dec:
            tables = attn.block_tables.to(torch.int64)
            nblocks = [-(-slens[i] // bs) for i in dec]
            groups = group_by_length(nblocks)
            if len(groups) == 1:
                groups = [list(range(len(dec)))]  # keep the step's order
            for members in groups:
                seqs = [dec[j] for j in members]
                nblk = max(nblocks[j] for j in members)
                idx = torch.tensor(seqs, dtype=torch.int64, device=device)
                blocks = tables.index_select(0, idx)[:, :nblk].reshape(-1)
                lens = [slens[i] for i in seqs]
                padded = nblk * bs
                lens_t = torch.tensor(lens, dtype=torch.int64, device=device)[:, None]
                pos = torch.arange(padded, dtype=torch.int64, device=device)[None, :]
                valid = pos < lens_t
                uniform = all(n == padded for n in lens)
                masks: dict[Window, torch.Tensor | None] = {}
                for w in windows:
                    needed = not uniform or (w is not None and padded > w)
                    mask = valid if w is None else valid & (pos >= lens_t - w)
                    masks[w] = _additive(mask[:, None, None, :], self.dtype) if needed else None
                token_rows = [starts[i] for i in seqs]
                first = token_rows[0]
                rows: slice | torch.Tensor
                if token_rows == list(range(first, first + len(seqs))):
                    rows = slice(first, first + len(seqs))  # a run of rows: no gather or scatter of q/out
                else:
                    rows = torch.tensor(token_rows, dtype=torch.int64, device=device)
                plan.decode_groups.append(_DecodeGroup(rows, blocks, len(seqs), padded, masks))
        for i, (n, total) in enumerate(zip(qlens, slens, strict=True)):
            if n == 1:
                continue
            qpos = torch.arange(total - n, total, device=device)[:, None]
            kpos = torch.arange(total, device=device)[None, :]
            causal = kpos <= qpos
            masks = {}
            for w in windows:
                if w is None:
                    masks[w] = None if n == total else _additive(causal, self.dtype)
                else:
                    masks[w] = _additive(causal & (kpos > qpos - w), self.dtype)
            blocks = None
            if n != total:
                blocks = attn.block_tables[i, : -(-total // bs)].to(torch.int64)
            plan.prefills.append(_PrefillSeq(starts[i], starts[i] + n, blocks, total, masks))
        return plan

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _SdpaPlan,
        window: Window,
    ) -> torch.Tensor:
        # One row per block: index_select copies whole blocks, several times faster than per token.
        k_blocks = k_cache.view(k_cache.shape[0], -1)
        v_blocks = v_cache.view(v_cache.shape[0], -1)
        groups = plan.decode_groups
        if not plan.prefills and len(groups) == 1 and groups[0].num_seqs == plan.num_tokens:
            return self._decode(q, k_blocks, v_blocks, groups[0], window)
        out = q.new_empty(q.shape)
        for group in groups:
            if isinstance(group.rows, slice):
                out[group.rows] = self._decode(q[group.rows], k_blocks, v_blocks, group, window)
            else:
                o = self._decode(q[group.rows], k_blocks, v_blocks, group, window)
                out.index_copy_(0, group.rows, o)
        for seq in plan.prefills:
            out[seq.start : seq.end] = self._prefill(q, k, v, k_blocks, v_blocks, seq, window)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_blocks: torch.Tensor,
        v_blocks: torch.Tensor,
        group: _DecodeGroup,
        window: Window,
    ) -> torch.Tensor:
        b = group.num_seqs
        groups = self.num_heads // self.num_kv_heads
        # One query per sequence: fold the GQA group into the query axis so K/V are never repeated.
        qg = q.reshape(b, self.num_kv_heads, groups, self.head_dim)
        shape = (b, group.padded_len, self.num_kv_heads, self.head_dim)
        kg = k_blocks.index_select(0, group.blocks).view(shape).transpose(1, 2).to(q.dtype)
        vg = v_blocks.index_select(0, group.blocks).view(shape).transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.masks[window], scale=self.scale)
        return o.reshape(b, self.num_heads, self.head_dim)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_blocks: torch.Tensor,
        v_blocks: torch.Tensor,
        seq: _PrefillSeq,
        window: Window,
    ) -> torch.Tensor:
        qs = q[seq.start : seq.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if seq.blocks is None:
            ks, vs = k[seq.start : seq.end], v[seq.start : seq.end]
        else:
            shape = (-1, self.num_kv_heads, self.head_dim)
            ks = k_blocks.index_select(0, seq.blocks).view(shape)[: seq.total].to(q.dtype)
            vs = v_blocks.index_select(0, seq.blocks).view(shape)[: seq.total].to(q.dtype)
        ks = ks.transpose(0, 1).unsqueeze(0)
        vs = vs.transpose(0, 1).unsqueeze(0)
        mask = seq.masks[window]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        return o.squeeze(0).transpose(0, 1)


# ------------------------------------------------------------------------------------- packed (varlen) plans


@dataclass
class _PackedPlan:
    cu_q: torch.Tensor  # [B+1] int32
    cu_k: torch.Tensor  # [B+1] int32
    max_q: int
    max_k: int
    k_slots: torch.Tensor | None  # [sum L] flat slots of every context, packed; None when reading pages
    block_tables: torch.Tensor
    extra: dict[Window, Any] = field(default_factory=dict)


def _packed_plan(attn: AttentionMetadata, gather: bool) -> _PackedPlan:
    device = attn.block_tables.device
    lens = torch.tensor(attn.seq_lens_cpu, dtype=torch.int32, device=device)
    cu_k = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    k_slots = None
    if gather:
        total = int(sum(attn.seq_lens_cpu))
        seq_of = torch.repeat_interleave(torch.arange(len(attn.seq_lens_cpu), device=device), lens.long())
        pos = torch.arange(total, device=device) - cu_k[:-1].long()[seq_of]
        k_slots = _slots(attn.block_tables, seq_of, pos, attn.block_size)
    return _PackedPlan(
        cu_q=attn.query_start_loc.to(device=device, dtype=torch.int32),
        cu_k=cu_k,
        max_q=attn.max_query_len,
        max_k=attn.max_seq_len,
        k_slots=k_slots,
        block_tables=attn.block_tables.to(torch.int32),
    )


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 varlen kernel; reads pages through block_table when block_size is a multiple of 256
    (flash-attn's paged-KV constraint), otherwise over a packed gather of each context."""

    name = "flash-attn"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from flash_attn import flash_attn_varlen_func

        self._fn = flash_attn_varlen_func

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window]) -> _PackedPlan:
        return _packed_plan(attn, gather=attn.block_size % 256 != 0)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _PackedPlan,
        window: Window,
    ) -> torch.Tensor:
        window_size = (-1, -1) if window is None else (window - 1, 0)
        if plan.k_slots is None:
            keys, values, table = k_cache, v_cache, plan.block_tables
        else:
            keys = k_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, plan.k_slots)
            values = v_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, plan.k_slots)
            table = None
        # flash-attn aligns the causal mask bottom-right when seqlen_q < seqlen_k: exactly our offsets.
        return self._fn(
            q.contiguous(),  # a column view of the fused QKV projection
            keys,
            values,
            plan.cu_q,
            plan.cu_k,
            plan.max_q,
            plan.max_k,
            softmax_scale=self.scale,
            causal=True,
            window_size=window_size,
            block_table=table,
        )


class FlashInferBackend(AttentionBackend):
    """flashinfer's paged prefill wrapper (NHD layout = our pool layout); one planned wrapper per window."""

    name = "flashinfer"
    _WORKSPACE_BYTES = 128 * 1024 * 1024

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import flashinfer

        self._flashinfer = flashinfer
        # Prefill and decode run concurrently in two threads: each needs its own workspace and wrappers.
        self._local = threading.local()

    def _wrappers(self, device: torch.device, count: int) -> list[Any]:
        pool: list[Any] = getattr(self._local, "wrappers", [])
        while len(pool) < count:
            workspace = torch.empty(self._WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            pool.append(self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"))
        self._local.wrappers = pool
        return pool[:count]

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window]) -> _PackedPlan:
        windows = sorted(set(windows), key=lambda w: -1 if w is None else w)
        bs = attn.block_size
        device = attn.block_tables.device
        nblocks = [(n + bs - 1) // bs for n in attn.seq_lens_cpu]
        kv_indptr = torch.tensor([0, *torch.tensor(nblocks).cumsum(0).tolist()], dtype=torch.int32)
        kv_indices = torch.cat([attn.block_tables[i, :nb] for i, nb in enumerate(nblocks)]).to(torch.int32)
        last_len = torch.tensor([n - (nb - 1) * bs for n, nb in zip(attn.seq_lens_cpu, nblocks, strict=True)])
        qo_indptr = torch.tensor(
            [0, *torch.tensor(attn.query_lens_cpu).cumsum(0).tolist()], dtype=torch.int32
        )
        plan = _PackedPlan(
            qo_indptr, kv_indptr, attn.max_query_len, attn.max_seq_len, None, attn.block_tables
        )
        for w, wrapper in zip(windows, self._wrappers(device, len(windows)), strict=True):
            # Host-side indptr/lengths (as vLLM passes them) let plan() schedule without a device sync.
            wrapper.plan(
                qo_indptr,
                kv_indptr,
                kv_indices,
                last_len.to(torch.int32),
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                bs,
                causal=True,
                window_left=-1 if w is None else w - 1,
                sm_scale=self.scale,
                q_data_type=self.dtype,
                kv_data_type=self.dtype,
            )
            plan.extra[w] = wrapper
        return plan

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _PackedPlan,
        window: Window,
    ) -> torch.Tensor:
        # q arrives as a column view of the fused QKV projection; the kernel wants dense rows.
        return plan.extra[window].run(q.contiguous(), (k_cache, v_cache))


class FlexBackend(AttentionBackend):
    """torch FlexAttention over a packed gather with a document + causal (+ window) block mask."""

    name = "flex"

    def __init__(self, *args: Any, device: torch.device) -> None:
        super().__init__(*args)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        # Eager flex materialises scores (fine on CPU for tests); CUDA gets the fused compiled kernel.
        self._fn = torch.compile(flex_attention, dynamic=True) if device.type == "cuda" else flex_attention

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window]) -> _PackedPlan:
        plan = _packed_plan(attn, gather=True)
        device = attn.block_tables.device
        qlens = torch.tensor(attn.query_lens_cpu, device=device)
        slens = torch.tensor(attn.seq_lens_cpu, device=device)
        bidx = torch.arange(len(attn.query_lens_cpu), device=device)
        q_seq = torch.repeat_interleave(bidx, qlens)
        k_seq = torch.repeat_interleave(bidx, slens)
        q_pos = torch.arange(q_seq.numel(), device=device) - plan.cu_q[:-1].long()[q_seq]
        q_pos = q_pos + (slens - qlens)[q_seq]
        k_pos = torch.arange(k_seq.numel(), device=device) - plan.cu_k[:-1].long()[k_seq]
        for w in set(windows):

            def mask_mod(
                b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, w: Window = w
            ) -> torch.Tensor:
                ok = (q_seq[qi] == k_seq[ki]) & (k_pos[ki] <= q_pos[qi])
                return ok if w is None else ok & (k_pos[ki] > q_pos[qi] - w)

            plan.extra[w] = self._create_block_mask(
                mask_mod, None, None, q_seq.numel(), k_seq.numel(), device=device
            )
        return plan

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _PackedPlan,
        window: Window,
    ) -> torch.Tensor:
        keys = k_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, plan.k_slots).to(q.dtype)
        values = v_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, plan.k_slots).to(q.dtype)
        o = self._fn(
            q.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            block_mask=plan.extra[window],
            scale=self.scale,
            enable_gqa=True,
        )
        return o.squeeze(0).transpose(0, 1)


# --------------------------------------------------------------------------------------------------- triton


@dataclass
class _ExtendPlan:
    """The multi-token sequences of a step, for the Triton extend kernel."""

    block_tables: torch.Tensor  # [P, W] int32
    row_starts: torch.Tensor  # [P] int32: first token row of each
    query_lens: torch.Tensor  # [P] int32
    seq_lens: torch.Tensor  # [P] int32
    max_query_len: int


@dataclass
class _TritonPlan:
    decode_rows: slice | torch.Tensor | None  # token rows of the single-token sequences; None: there are none
    block_tables: torch.Tensor  # [Bd, W] int32, of those sequences
    seq_lens: torch.Tensor  # [Bd] int32
    splits: int
    workspace: tuple[torch.Tensor, torch.Tensor] | None  # the kernel's partials, shared by all layers
    # The multi-token sequences (both None when the step is decode only): the extend kernel's, or sdpa's.
    extend: _ExtendPlan | None = None
    prefill: _SdpaPlan | None = None


class TritonBackend(SdpaBackend):
    """Single-token sequences through the Triton split-KV paged decode kernel, multi-token ones (prefill
    chunks, with or without a cached prefix) through the Triton extend kernel; both read the paged pool.

    A decode-only plan reads nothing from the host but the batch size: the block tables and lengths stay
    device tensors, so a forward pass over static buffers can be captured in a CUDA graph and replayed.
    `use_kernel=False` runs the same plans without triton: a fixed-shape torch decode, sdpa for the rest.
    """

    name = "triton"
    cuda_graph_decode = True

    def __init__(self, *args: Any, use_kernel: bool = True) -> None:
        super().__init__(*args)
        self.use_kernel = use_kernel

    def plan(self, attn: AttentionMetadata, windows: Iterable[Window], decodes: bool = True) -> _TritonPlan:
        device = attn.block_tables.device
        extend, prefill = None, None
        if attn.is_decode_only:
            rows: slice | torch.Tensor | None = slice(0, attn.num_seqs)
            tables, lens = attn.block_tables, attn.seq_lens
        else:
            starts = [0]
            for n in attn.query_lens_cpu:
                starts.append(starts[-1] + n)
            dec = [i for i, n in enumerate(attn.query_lens_cpu) if n == 1]
            token_rows = [starts[i] for i in dec]
            idx = torch.tensor(dec, dtype=torch.int64, device=device)
            tables = attn.block_tables.index_select(0, idx)
            lens = attn.seq_lens.index_select(0, idx)
            rows = None
            if dec and token_rows == list(range(token_rows[0], token_rows[0] + len(dec))):
                rows = slice(token_rows[0], token_rows[0] + len(dec))  # the usual layout: decodes last
            elif dec:
                rows = torch.tensor(token_rows, dtype=torch.int64, device=device)
            multi = [i for i, n in enumerate(attn.query_lens_cpu) if n > 1]
            if not self.use_kernel:
                prefill = super().plan(attn, windows, decodes=False)
            elif multi:
                idx = torch.tensor(multi, dtype=torch.int64, device=device)
                extend = _ExtendPlan(
                    attn.block_tables.index_select(0, idx),
                    torch.tensor([starts[i] for i in multi], dtype=torch.int32, device=device),
                    torch.tensor([attn.query_lens_cpu[i] for i in multi], dtype=torch.int32, device=device),
                    attn.seq_lens.index_select(0, idx).to(torch.int32),
                    max(attn.query_lens_cpu[i] for i in multi),
                )
        num = tables.shape[0]
        splits = num_kv_splits(num, self.num_kv_heads, device)
        workspace = None
        if self.use_kernel and num:
            workspace = decode_workspace(num, self.num_heads, self.head_dim, splits, device)
        return _TritonPlan(rows, tables, lens, splits, workspace, extend, prefill)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _TritonPlan,  # type: ignore[override]
        window: Window,
    ) -> torch.Tensor:
        if plan.prefill is None and plan.extend is None:
            return self._paged_decode(q, k_cache, v_cache, plan, window)
        out = q.new_empty(q.shape)
        if plan.extend is not None:
            e = plan.extend
            paged_extend(
                q,
                out,
                k_cache,
                v_cache,
                e.block_tables,
                e.row_starts,
                e.query_lens,
                e.seq_lens,
                e.max_query_len,
                self.scale,
                window,
            )
        if plan.prefill is not None:
            k_blocks = k_cache.view(k_cache.shape[0], -1)
            v_blocks = v_cache.view(v_cache.shape[0], -1)
            for seq in plan.prefill.prefills:
                out[seq.start : seq.end] = self._prefill(q, k, v, k_blocks, v_blocks, seq, window)
        if isinstance(plan.decode_rows, slice):
            out[plan.decode_rows] = self._paged_decode(q[plan.decode_rows], k_cache, v_cache, plan, window)
        elif plan.decode_rows is not None:
            o = self._paged_decode(q.index_select(0, plan.decode_rows), k_cache, v_cache, plan, window)
            out.index_copy_(0, plan.decode_rows, o)
        return out

    def _paged_decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _TritonPlan, window: Window
    ) -> torch.Tensor:
        if not self.use_kernel:
            return paged_decode_torch(
                q, k_cache, v_cache, plan.block_tables, plan.seq_lens, self.scale, window
            )
        return paged_decode(
            q,
            k_cache,
            v_cache,
            plan.block_tables,
            plan.seq_lens,
            self.scale,
            window,
            plan.splits,
            plan.workspace,
        )


def create_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> AttentionBackend:
    """Instantiate the backend `resolve_backend` picks for this device and dtype."""
    device = torch.device(device)
    resolved = resolve_backend(name, device, dtype)
    args = (num_heads, num_kv_heads, head_dim, head_dim**-0.5, dtype)
    if resolved == "flash-attn":
        return FlashAttnBackend(*args)
    if resolved == "flashinfer":
        return FlashInferBackend(*args)
    if resolved == "flex":
        return FlexBackend(*args, device=device)
    if resolved == "triton":
        return TritonBackend(*args)
    return SdpaBackend(*args)

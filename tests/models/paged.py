"""A minimal paged-KV driver for model tests: allocates blocks, builds AttentionMetadata, runs greedy loops."""

from __future__ import annotations

import random

import torch

from drift_agent.models.attention_metadata import AttentionMetadata


class PagedDriver:
    """Owns a KV pool bound to `model` and hands out blocks in shuffled order, so block tables are not
    contiguous ranges and tokens of one sequence span several non-adjacent blocks."""

    def __init__(
        self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4, seed: int = 0
    ) -> None:
        self.model = model
        self.block_size = block_size
        dtype = model.model.embed_tokens.weight.dtype
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(model.num_layers)
        ]
        model.bind_kv_cache(self.kv)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def metadata(
        self, batch: list[tuple[int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """batch: (seq_id, new token ids) per sequence -> (input_ids, positions, metadata) for one step."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        for seq_id, tokens in batch:
            table = self.tables.setdefault(seq_id, [])
            start = self.lens.get(seq_id, 0)
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for pos in range(start, end):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, end)
            qlens.append(len(tokens))
            slens.append(end)
            self.lens[seq_id] = end
        width = max(len(self.tables[s]) for s, _ in batch)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in batch]
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor(slens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            block_size=self.block_size,
        )
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), attn

    def step_logits(self, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Run one step; returns float32 logits for every new token, [N, vocab]."""
        input_ids, positions, attn = self.metadata(batch)
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, attn)
            return self.model.compute_logits(hidden)


def greedy_generate(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int, block_size: int = 16
) -> list[int]:
    """Prefill the prompt, then decode one token per step through the paged cache."""
    driver = PagedDriver(
        model, num_blocks=(len(prompt) + max_new_tokens) // block_size + 2, block_size=block_size
    )
    out: list[int] = []
    logits = driver.step_logits([(0, prompt)])
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = driver.step_logits([(0, [token])])
    return out


def dense_attention(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    qlens: list[int],
    window: int | None,
) -> torch.Tensor:
    """Explicit softmax(q k^T) v per sequence in fp32, causal offset and HF's window rule (k > q - window)."""
    heads, kv_heads, dim = q.shape[1], keys[0].shape[1], q.shape[2]
    out, start = [], 0
    for k_s, v_s, n in zip(keys, values, qlens, strict=True):
        total = k_s.shape[0]
        qs = q[start : start + n].float()
        start += n
        kr = k_s.float().repeat_interleave(heads // kv_heads, dim=1)
        vr = v_s.float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", qs, kr) * dim**-0.5
        qpos = torch.arange(total - n, total)[:, None]
        kpos = torch.arange(total)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed &= kpos > qpos - window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), vr))
    return torch.cat(out)

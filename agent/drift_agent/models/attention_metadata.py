"""What one forward pass needs to know about its sequences to attend over the paged KV pool.

The model runner builds it from a scheduled batch; attention backends consume it. Tokens of all sequences are
flattened into one dimension of N tokens; sequence i owns rows query_start_loc[i]:query_start_loc[i+1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # [N] int64: flat KV slot (block_id * block_size + offset) that each new token's K/V is written to.
    slot_mapping: torch.Tensor
    # [B+1] int32: prefix sums of query lengths (cu_seqlens_q).
    query_start_loc: torch.Tensor
    # [B] int32: context length of each sequence *including* this step's new tokens (KV length after writing).
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: block table per sequence, padded with 0 (padding is never read past seq_lens).
    block_tables: torch.Tensor
    # Host-side copies for CPU loops and kernel launch parameters.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

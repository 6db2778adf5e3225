"""Paged KV block accounting with prefix caching. Pure Python: no tensors, so the simulator reuses it.

Blocks hold `block_size` tokens. A full block is published under a chained hash (parent hash, its tokens) so a
later sequence with the same prefix (a shared system prompt, the earlier turns of a conversation) reuses its KV in
place. A freed block keeps its content and hash until it is handed out again, so the free list doubles as an LRU
of evictable cached blocks: allocation takes the least recently freed block first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order = eviction order (front is least recently freed).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # A block has a hash exactly when this index maps that hash to it.
        self.hash_to_block: dict[int, int] = {}
        # Prefix-cache statistics in tokens, vLLM style (queries = prompt tokens looked up, hits = reused).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding a verified prefix of `seq`. At least one token is always left to compute,
        because the model must run on the last prompt token to produce the next one."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self._ensure_hashes(seq, max_blocks)
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            h = seq.block_hashes[i]
            bid = self.hash_to_block.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            # Verify by content: a hash match alone is not proof.
            if block.parent_hash != parent or block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(bid)
            parent = h
        return hits

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    # ---- mutations -----------------------------------------------------------------------------------
    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | tuple[int, ...] = (), reserve: int = 0
    ) -> bool:
        """Whether `allocate` would succeed and leave at least `reserve` blocks free."""
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(cached)
        # Cached blocks that are currently free stop being allocatable once we take them.
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return max(need, 0) <= len(self.free) - revived - reserve

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | tuple[int, ...] = (), reserve: int = 0
    ) -> bool:
        """Extend `seq.block_table` with the `cached` prefix blocks, then with fresh blocks so that the
        next `num_new_tokens` tokens have slots. All or nothing: returns False and changes nothing when the
        pool cannot hold them with `reserve` blocks left free. The caller advances
        `seq.num_computed_tokens` past the cached prefix."""
        if cached:
            if not self.can_allocate(seq, num_new_tokens, cached, reserve):
                return False
            for bid in cached:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    del self.free[bid]
                block.ref_count += 1
                seq.block_table.append(bid)
            # The reused prefix is published already; fresh blocks are published once full.
            seq.num_registered_blocks = len(seq.block_table)
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table)
        if need <= 0:  # the per-step case: the last block still has room
            return True
        if not cached and need > len(self.free) - reserve:  # (with `cached`, can_allocate checked it)
            return False
        popitem, blocks = self.free.popitem, self.blocks
        # A long prompt takes hundreds at once; a decode step crossing into a new block, one.
        fresh = [popitem(last=False)[0] for _ in range(need)] if need > 1 else [popitem(last=False)[0]]
        for bid in fresh:
            block = blocks[bid]
            if block.hash is not None:  # evict its cached content
                if self.hash_to_block.get(block.hash) == bid:
                    del self.hash_to_block[block.hash]
                block.hash, block.parent_hash, block.token_ids = None, None, ()
            block.ref_count = 1
        seq.block_table += fresh
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that became full of computed KV since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if n_full <= seq.num_registered_blocks:
            return
        self._ensure_hashes(seq, n_full)
        for i in range(seq.num_registered_blocks, n_full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.hash is None and h not in self.hash_to_block:
                block.hash = h
                block.parent_hash = seq.block_hashes[i - 1] if i else None
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.hash_to_block[h] = block.block_id
        seq.num_registered_blocks = n_full

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are freed first so they are evicted first: a later
        request is likelier to share the head of a prompt than its tail."""
        blocks, free = self.blocks, self.free
        for bid in reversed(seq.block_table):
            block = blocks[bid]
            block.ref_count = rc = block.ref_count - 1
            if rc <= 0:
                if rc < 0:
                    raise AssertionError(f"block {bid} freed twice")
                free[bid] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for bid in self.free:
            block = self.blocks[bid]
            block.hash, block.parent_hash, block.token_ids = None, None, ()
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.blocks[b].ref_count > 0}

    def check_invariants(self) -> None:
        """Consistency of refcounts, the free list and the hash index. Raises AssertionError explicitly (not
        with `assert`), so the engine's check after a failed step holds under `python -O` too."""
        free, index = self.free, self.hash_to_block
        for block in self.blocks:
            if block.ref_count < 0:
                raise AssertionError(f"negative refcount: {block}")
            if (block.ref_count == 0) != (block.block_id in free):
                raise AssertionError(f"free list disagrees with the refcount: {block}")
            if block.hash is not None and index.get(block.hash) != block.block_id:
                raise AssertionError(f"hash not indexed: {block}")
        if len(free) > self.num_blocks or any(not 0 <= bid < self.num_blocks for bid in free):
            raise AssertionError("free list holds unknown block ids")
        for h, bid in index.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"hash index points at block {bid}, which holds another hash")

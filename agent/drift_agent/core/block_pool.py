"""One tier of KV blocks (the device pool, or the host tier behind it): refcounts, free blocks, the prefix index.
Pure Python: no tensors, so the simulator reuses it.

A full block is published under a chained hash (parent hash, its tokens). A released block keeps its content
and hash until it is handed out again, so free blocks holding content double as an LRU of evictable cached
blocks. Free blocks without content are handed out first, lowest id first, so a request's blocks come as
contiguous runs wherever the pool allows (FastSwitch's block groups): its swap is then a few large copies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sortedcontainers import SortedList


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockPool:
    def __init__(self, num_blocks: int, name: str = "device") -> None:
        if num_blocks < 1:
            raise ValueError(f"the {name} pool needs at least one block")
        self.name = name
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.empty = SortedList(range(num_blocks))  # free, no content: handed out first, lowest id first
        self.cached = OrderedDict[int, None]()  # free with content; order = eviction order (front first)
        # A block has a hash exactly when this index maps that hash to it.
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.cached)

    def lookup(self, h: int, parent: int | None, tokens: tuple[int, ...]) -> int | None:
        """The block holding hash `h`, verified by content: a hash match alone is not proof."""
        bid = self.hash_to_block.get(h)
        if bid is None:
            return None
        block = self.blocks[bid]
        return bid if block.parent_hash == parent and block.token_ids == tokens else None

    def take(self, n: int) -> list[int]:
        """`n` free blocks, each with one reference: empty ones first (lowest ids, so consecutive where they
        can be), then the least recently released cached ones, whose content is dropped. The caller checked
        `num_free`."""
        if n > self.num_free:
            raise AssertionError(f"{self.name} pool: {n} blocks asked, {self.num_free} free")
        empty, blocks = self.empty, self.blocks
        k = min(n, len(empty))
        if k == 1:
            taken = [empty.pop(0)]
        elif k:
            taken = list(empty.islice(0, k))
            del empty[:k]
        else:
            taken = []
        if n > k:
            popitem = self.cached.popitem
            evicted = [popitem(last=False)[0] for _ in range(n - k)]
            for bid in evicted:
                self.drop_content(blocks[bid])
            # In id order: neighbours in the LRU are often neighbours in the pool (released together), and a
            # request's table in ascending order makes them one run for a copy.
            taken += sorted(evicted)
        for bid in taken:
            blocks[bid].ref_count = 1
        return taken

    def hold(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            if block.hash is None:
                self.empty.remove(bid)
            else:
                del self.cached[bid]
        block.ref_count += 1

    def release(self, bid: int) -> bool:
        """Drop one reference; True when the block became free (then it stays cached if it has content)."""
        block = self.blocks[bid]
        block.ref_count = rc = block.ref_count - 1
        if rc > 0:
            return False
        if rc < 0:
            raise AssertionError(f"{self.name} block {bid} freed twice")
        if block.hash is None:
            self.empty.add(bid)
        else:
            self.cached[bid] = None
        return True

    def publish(self, bid: int, h: int, parent: int | None, tokens: tuple[int, ...]) -> bool:
        """Index a held block's content under `h`, unless another block already holds that hash."""
        block = self.blocks[bid]
        if block.hash is not None or h in self.hash_to_block:
            return False
        block.hash, block.parent_hash, block.token_ids = h, parent, tokens
        self.hash_to_block[h] = bid
        return True

    def drop_content(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.parent_hash, block.token_ids = None, None, ()

    def reset_cache(self) -> None:
        """Forget the content of every free block (held blocks keep theirs)."""
        for bid in self.cached:
            self.drop_content(self.blocks[bid])
            self.empty.add(bid)
        self.cached.clear()

    def check_invariants(self) -> None:
        """Refcounts, the free sets and the hash index agree. Raises AssertionError explicitly (not with
        `assert`), so the engine's check after a failed step holds under `python -O` too."""
        empty, cached, index = self.empty, self.cached, self.hash_to_block
        if set(empty) & set(cached):
            raise AssertionError(f"{self.name} pool: a block is both empty and cached")
        for block in self.blocks:
            bid = block.block_id
            if block.ref_count < 0:
                raise AssertionError(f"{self.name} pool: negative refcount: {block}")
            if (block.ref_count == 0) != (bid in empty or bid in cached):
                raise AssertionError(f"{self.name} pool: free sets disagree with the refcount: {block}")
            if bid in empty and block.hash is not None or bid in cached and block.hash is None:
                raise AssertionError(f"{self.name} pool: a free block is filed by the wrong content: {block}")
            if block.hash is not None and index.get(block.hash) != bid:
                raise AssertionError(f"{self.name} pool: hash not indexed: {block}")
        if any(not 0 <= bid < self.num_blocks for bid in (*empty, *cached)):
            raise AssertionError(f"{self.name} pool: free sets hold unknown block ids")
        for h, bid in index.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(
                    f"{self.name} pool: index points at block {bid}, which holds another hash"
                )

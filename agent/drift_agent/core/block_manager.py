"""Paged KV block accounting over two tiers, with prefix caching. Pure Python: no tensors, so the simulator
reuses it.

The device pool holds the KV the model reads; the optional host tier (`--swap-space-gb`) holds what the device
pool let go, and the KV of swapped-out sequences (FastSwitch, SGLang's HiCache):
- a cached block released by its last sequence is copied to the host tier (unless the tier has its content
  already), off the critical path, so evicting it from the device later loses nothing;
- a prefix lookup goes on into the host tier where the device hits end, and host hits are promoted back by
  copy instead of recomputed (the next turn of a conversation whose earlier turns were evicted);
- swap preemption copies a sequence's KV out and back in; blocks whose content the other tier holds already
  are reused instead of copied.

Copies are described (`KVCopies`) and collected until the engine takes them (`take_copies`); the blocks they
read or write stay held until the engine reports them done (`copies_done`), so none is handed out mid-copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_pool import Block, BlockPool, chain_hash
from .kv_copies import KVCopies
from .sequence import Sequence

__all__ = ["Block", "BlockManager", "PrefixHit", "chain_hash"]


@dataclass
class PrefixHit:
    """A prompt's cached prefix: its first blocks on the device, then the ones after them in the host tier."""

    device: list[int] = field(default_factory=list)
    host: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.device) + len(self.host)


@dataclass
class _Holds:
    """Blocks an outstanding submission of copies reads or writes, released when it is done."""

    device: list[int] = field(default_factory=list)
    host: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
        host_prefix_cache: bool = True,
    ) -> None:
        """`host_prefix_cache=False`: the host tier only holds swapped-out sequences (released blocks are not
        saved there and prefix lookups stop at the device), to tell its two uses apart in a study."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        if num_host_blocks < 0:
            raise ValueError("num_host_blocks must not be negative")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.device = BlockPool(num_blocks, "device")
        self.host: BlockPool | None = BlockPool(num_host_blocks, "host") if num_host_blocks else None
        self.host_prefix_cache = host_prefix_cache and self.host is not None
        self.num_blocks = num_blocks
        self.blocks = self.device.blocks
        self.pending = KVCopies()  # collected since the engine last took them
        self._holds: dict[int, _Holds] = {self.pending.ticket: _Holds()}
        # Prefix-cache statistics in tokens, vLLM style (queries = prompt tokens looked up, hits = reused);
        # host hits are part of the hits.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_host_hits = 0
        # Blocks copied per reason, and swap-out blocks not copied because the host tier held them already.
        self.demoted_blocks = 0
        self.promoted_blocks = 0
        self.swapped_out_blocks = 0
        self.swapped_in_blocks = 0
        self.reused_blocks = 0

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def hash_to_block(self) -> dict[int, int]:
        return self.device.hash_to_block

    @property
    def num_free_blocks(self) -> int:
        return self.device.num_free

    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host is not None else 0

    @property
    def num_free_host_blocks(self) -> int:
        return self.host.num_free if self.host is not None else 0

    @property
    def usage(self) -> float:
        """Fraction of device blocks held (by sequences or copies; cached-but-free blocks count as free)."""
        return 1.0 - self.device.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))

    def lookup_prefix(self, seq: Sequence) -> PrefixHit:
        """The blocks holding a verified prefix of `seq`: on the device while it has them, then in the host
        tier. At least one token is always left to compute, because the model must run on the last prompt
        token to produce the next one."""
        hit = PrefixHit()
        if not self.enable_prefix_caching:
            return hit
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self._ensure_hashes(seq, max_blocks)
        tier, found = self.device, hit.device
        parent: int | None = None
        for i in range(max_blocks):
            h = seq.block_hashes[i]
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            bid = tier.lookup(h, parent, tokens)
            if bid is None and tier is self.device and self.host_prefix_cache:
                tier, found = self.host, hit.host
                bid = tier.lookup(h, parent, tokens)
            if bid is None:
                break
            found.append(bid)
            parent = h
        return hit

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The device blocks of `seq`'s cached prefix (see `lookup_prefix`)."""
        return self.lookup_prefix(seq).device

    def record_prefix_lookup(
        self, num_prompt_tokens: int, num_hit_tokens: int, num_host_tokens: int = 0
    ) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens
        self.prefix_host_hits += num_host_tokens

    # ---- sequences on the device ---------------------------------------------------------------------
    @staticmethod
    def _hit(cached: PrefixHit | list[int] | tuple[int, ...]) -> PrefixHit:
        return cached if isinstance(cached, PrefixHit) else PrefixHit(list(cached))

    def can_allocate(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached: PrefixHit | list[int] | tuple[int, ...] = (),
        reserve: int = 0,
    ) -> bool:
        """Whether `allocate` would succeed and leave at least `reserve` blocks free."""
        hit = self._hit(cached)
        computed = seq.num_computed_tokens + hit.num_blocks * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(hit.device)
        # Cached blocks that are currently free stop being allocatable once we take them.
        revived = sum(1 for b in hit.device if self.blocks[b].ref_count == 0)
        return max(need, 0) <= self.device.num_free - revived - reserve

    def allocate(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached: PrefixHit | list[int] | tuple[int, ...] = (),
        reserve: int = 0,
    ) -> bool:
        """Extend `seq.block_table` with the `cached` prefix blocks (host hits get fresh device blocks and a
        blocking copy in), then with fresh blocks so that the next `num_new_tokens` tokens have slots. All or
        nothing: returns False and changes nothing when the pool cannot hold them with `reserve` blocks left
        free. The caller advances `seq.num_computed_tokens` past the cached prefix."""
        hit = self._hit(cached)
        device = self.device
        if hit.num_blocks:
            if not self.can_allocate(seq, num_new_tokens, hit, reserve):
                return False
            for bid in hit.device:
                device.hold(bid)
                seq.block_table.append(bid)
            if hit.host:
                self._promote(seq, hit.host)
            # The reused prefix is published already; fresh blocks are published once full.
            seq.num_registered_blocks = len(seq.block_table)
        computed = seq.num_computed_tokens + hit.num_blocks * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table)
        if need <= 0:  # the per-step case: the last block still has room
            return True
        if not hit.num_blocks and need > device.num_free - reserve:  # (with a hit, can_allocate checked it)
            return False
        seq.block_table += device.take(need)
        return True

    def _promote(self, seq: Sequence, host_blocks: list[int]) -> None:
        """Copy the host hits after the device prefix of `seq` into fresh device blocks. They are published at
        once: the copy is blocking, so no forward pass reads them before it lands."""
        host, device, holds = self.host, self.device, self._holds[self.pending.ticket]
        assert host is not None
        first = len(seq.block_table)
        fresh = device.take(len(host_blocks))
        for i, (hb, db) in enumerate(zip(host_blocks, fresh, strict=True), start=first):
            host.hold(hb)
            holds.host.append(hb)
            self.pending.swap_in.append((hb, db))
            src = host.blocks[hb]
            device.publish(db, seq.block_hashes[i], src.parent_hash, src.token_ids)
        self.pending.blocking = True
        self.promoted_blocks += len(fresh)
        seq.block_table += fresh

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that became full of computed KV since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if n_full <= seq.num_registered_blocks:
            return
        self._ensure_hashes(seq, n_full)
        publish, hashes, table, tokens = self.device.publish, seq.block_hashes, seq.block_table, seq.token_ids
        for i in range(seq.num_registered_blocks, n_full):
            publish(table[i], hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * bs : (i + 1) * bs]))
        seq.num_registered_blocks = n_full

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are freed first so they are evicted first: a later
        request is likelier to share the head of a prompt than its tail. With a host tier, cached blocks this
        frees are copied there first (they are free once the copy is done)."""
        device, host = self.device, self.host if self.host_prefix_cache else None
        demote: list[int] = []
        for bid in reversed(seq.block_table):
            block = device.blocks[bid]
            if (
                block.ref_count == 1
                and host is not None
                and block.hash is not None
                and block.hash not in host.hash_to_block
            ):
                demote.append(bid)
                continue
            device.release(bid)
        if demote:
            self._demote(demote[::-1])
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _demote(self, bids: list[int]) -> None:
        """Copy cached device blocks, held only by the caller, to the host tier (head first, as far as the
        tier has room), and release them once copied; the rest are released now."""
        host, device = self.host, self.device
        assert host is not None
        n = min(len(bids), host.num_free)
        holds = self._holds[self.pending.ticket]
        for db, hb in zip(bids[:n], host.take(n), strict=True):
            src = device.blocks[db]
            host.publish(hb, src.hash, src.parent_hash, src.token_ids)
            self.pending.swap_out.append((db, hb))
            holds.device.append(db)
            holds.host.append(hb)
        for db in reversed(bids[n:]):
            device.release(db)
        self.demoted_blocks += n

    # ---- swapping ------------------------------------------------------------------------------------
    def _swap_out_plan(self, seq: Sequence) -> tuple[list[int | None], int]:
        """Per block holding `seq`'s KV, the host block that holds its content already (None: copy it), and
        how many free host blocks that takes (the copies', and the reused ones that are free now)."""
        assert self.host is not None
        device, host = self.device, self.host
        plan: list[int | None] = []
        revived = 0
        for bid in seq.block_table[: self.blocks_needed(seq.num_computed_tokens)]:
            block = device.blocks[bid]
            hb = None if block.hash is None else host.lookup(block.hash, block.parent_hash, block.token_ids)
            if hb is not None and host.blocks[hb].ref_count == 0:
                revived += 1
            plan.append(hb)
        return plan, plan.count(None) + revived

    def swap_out(self, seq: Sequence) -> bool:
        """Move the KV of `seq` (not in flight) to the host tier: blocks the tier holds already are reused,
        the rest copied, and its device blocks are free at once (the copy blocks the next forward pass). False,
        changing nothing, when the tier has no room for it."""
        if self.host is None:
            return False
        plan, n_free = self._swap_out_plan(seq)
        if n_free > self.host.num_free:
            return False
        n_copy = plan.count(None)
        device, host = self.device, self.host
        for reuse in plan:  # held first: a free one must not be evicted to make room for the copies
            if reuse is not None:
                host.hold(reuse)
        targets = iter(host.take(n_copy))
        host_table: list[int] = []
        for bid, reuse in zip(seq.block_table, plan, strict=False):
            if reuse is not None:
                host_table.append(reuse)
                continue
            hb = next(targets)
            src = device.blocks[bid]
            if src.hash is not None:  # its content is indexed in the host tier too
                host.publish(hb, src.hash, src.parent_hash, src.token_ids)
            self.pending.swap_out.append((bid, hb))
            host_table.append(hb)
        # The blocks are free at once, for the sequence the preemption makes room for: the copy is blocking,
        # so no forward pass overwrites them before it has read them.
        for bid in reversed(seq.block_table):
            device.release(bid)
        if n_copy:
            self.pending.blocking = True
        self.swapped_out_blocks += n_copy
        self.reused_blocks += len(plan) - n_copy
        seq.host_block_table = host_table
        seq.block_table = []
        seq.num_registered_blocks = 0
        return True

    def _swap_in_plan(self, seq: Sequence, reserve: int) -> list[int | None] | None:
        """Per host block of `seq`, the device block that holds its content already (None: copy it); None
        when the device pool cannot take it with `reserve` blocks left free."""
        assert self.host is not None
        device, host = self.device, self.host
        plan: list[int | None] = []
        revived = 0
        for hb in seq.host_block_table:
            block = host.blocks[hb]
            bid = (
                None if block.hash is None else device.lookup(block.hash, block.parent_hash, block.token_ids)
            )
            if bid is not None and device.blocks[bid].ref_count == 0:
                revived += 1
            plan.append(bid)
        return plan if plan.count(None) + revived <= device.num_free - reserve else None

    def swap_in(self, seq: Sequence, reserve: int = 0) -> int | None:
        """Bring a swapped-out `seq`'s KV back to the device. The copy overlaps compute: the sequence must not
        run before the returned submission (a `KVCopies.ticket`) is done, and then `register_full_blocks`
        publishes its blocks; 0 when the device held all of it already (nothing to wait for). None, changing
        nothing, when the device pool cannot take it."""
        plan = self._swap_in_plan(seq, reserve)
        if plan is None:
            return None
        device, host = self.device, self.host
        assert host is not None
        holds = self._holds[self.pending.ticket]
        for reuse in plan:  # held first: a free one must not be evicted to make room for the copies
            if reuse is not None:
                device.hold(reuse)
        fresh = iter(device.take(plan.count(None)))
        table: list[int] = []
        for hb, reuse in zip(seq.host_block_table, plan, strict=True):
            if reuse is not None:
                table.append(reuse)
                host.release(hb)
                continue
            db = next(fresh)
            self.pending.swap_in.append((hb, db))
            holds.host.append(hb)  # the sequence's reference, until the copy is done
            table.append(db)
        self.swapped_in_blocks += plan.count(None)
        self.reused_blocks += len(plan) - plan.count(None)
        seq.block_table = table
        seq.host_block_table = []
        seq.num_registered_blocks = 0
        return self.pending.ticket if None in plan else 0

    def free_host_blocks(self, seq: Sequence) -> None:
        """Drop a swapped-out sequence's host blocks (it ended while swapped out)."""
        assert self.host is not None or not seq.host_block_table
        for hb in reversed(seq.host_block_table):
            self.host.release(hb)
        seq.host_block_table = []

    # ---- copies --------------------------------------------------------------------------------------
    def take_copies(self) -> KVCopies | None:
        """The copies collected since the last call, for the engine to submit (None when there are none)."""
        if self.pending.is_empty:
            return None
        taken, self.pending = self.pending, KVCopies()
        self._holds[self.pending.ticket] = _Holds()
        return taken

    def copies_done(self, ticket: int) -> None:
        """A submission's copies landed: release the blocks they held."""
        assert ticket != self.pending.ticket, "copies reported done before they were taken"
        holds = self._holds.pop(ticket)
        for bid in reversed(holds.device):
            self.device.release(bid)
        for hb in reversed(holds.host):
            self.host.release(hb)

    @property
    def copies_outstanding(self) -> int:
        """Submissions taken and not reported done."""
        return len(self._holds) - 1

    def held_by_copies(self) -> tuple[dict[int, int], dict[int, int]]:
        """References outstanding copies hold, per device block and per host block."""
        device: dict[int, int] = {}
        host: dict[int, int] = {}
        for holds in self._holds.values():
            for bid in holds.device:
                device[bid] = device.get(bid, 0) + 1
            for hb in holds.host:
                host[hb] = host.get(hb, 0) + 1
        return device, host

    def reset_prefix_cache(self) -> None:
        self.device.reset_cache()
        if self.host is not None:
            self.host.reset_cache()

    def check_invariants(self) -> None:
        """Consistency of each tier's refcounts, free sets and hash index. Raises AssertionError."""
        self.device.check_invariants()
        if self.host is not None:
            self.host.check_invariants()
        elif not self.pending.is_empty:
            raise AssertionError("copies pending without a host tier")

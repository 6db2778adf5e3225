"""The host KV tier on the virtual clock: what the block manager's copies (`core.kv_copies.KVCopies`) cost.

The block manager and scheduler are the engine's; this module only times the copies they ask for, the way the
engine's copier (`engine.kv_swap.KVCopier`) runs them: one FIFO for both directions, each submission's copies
out before its copies in, overlapping compute. A submission that a batch reads (host prefix hits promoted back)
is *blocking*: the step waits for it, and for every submission before it. The others land in the background
and are reported to the scheduler (`Scheduler.copies_done`) at the first step boundary after they complete.

Cost of one submission: per run of consecutive blocks (`KVCopies.runs`: contiguous block groups move as one
copy) a fixed latency plus its bytes over the host link at `HOST_COPY_EFFICIENCY` of the datasheet rate. With
tensor parallelism each GPU moves its own shard over its own link, in parallel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..core.kv_copies import DIRECTIONS, Direction, KVCopies

# Pinned-memory DMA over PCIe reaches about 80% of the link's nominal rate (e.g. ~25 GB/s of Gen4 x16's 32,
# ~50 GB/s of Gen5's 64 in `cudaMemcpyAsync` bandwidth tests).
HOST_COPY_EFFICIENCY = 0.8
# Fixed cost of one copy (a run of consecutive blocks): issuing the DMA and its setup on the copy engine. It is
# what makes block groups pay: a sequence scattered over single blocks pays it per block.
COPY_RUN_LATENCY_S = 10e-6


@dataclass
class DirectionStats:
    """Copies one way: runs (copies issued), blocks, bytes over the whole TP group, and seconds on the copy
    engine (latency plus transfer)."""

    runs: int = 0
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"runs": self.runs, "blocks": self.blocks, "bytes": self.bytes, "copy_s": self.seconds}


@dataclass
class CopyEngine:
    """One instance's copy engine: submissions in FIFO order, each done at (when the engine is free) + (its
    duration). `block_bytes`: one GPU's shard of a block; `host_bw`: one GPU's host link, bytes/s one way."""

    block_bytes: int
    host_bw: float
    tp: int = 1
    free_at: float = 0.0
    in_flight: deque[tuple[float, int]] = field(default_factory=deque)  # (done time, ticket), FIFO
    stats: dict[Direction, DirectionStats] = field(
        default_factory=lambda: {d: DirectionStats() for d in DIRECTIONS}
    )
    blocking_wait_s: float = 0.0  # steps held back for blocking copies, summed

    @property
    def block_s(self) -> float:
        """Seconds to move one block one way (every GPU its shard, in parallel), latency aside."""
        return self.block_bytes / (self.host_bw * HOST_COPY_EFFICIENCY)

    def submit(self, copies: KVCopies, now: float) -> float:
        """Queue `copies` at `now`; when they will be done."""
        duration = 0.0
        for direction in DIRECTIONS:
            runs = copies.runs(direction)
            if not runs:
                continue
            blocks = sum(r.num_blocks for r in runs)
            secs = len(runs) * COPY_RUN_LATENCY_S + blocks * self.block_s
            s = self.stats[direction]
            s.runs += len(runs)
            s.blocks += blocks
            s.bytes += blocks * self.block_bytes * self.tp
            s.seconds += secs
            duration += secs
        done = max(now, self.free_at) + duration
        self.free_at = done
        self.in_flight.append((done, copies.ticket))
        return done

    def land(self, now: float) -> list[int]:
        """Tickets of the submissions done by `now`, in order (each reported once)."""
        landed: list[int] = []
        in_flight = self.in_flight
        while in_flight and in_flight[0][0] <= now:
            landed.append(in_flight.popleft()[1])
        return landed

    @property
    def last_done(self) -> float | None:
        """When everything submitted is done (None: nothing in flight)."""
        return self.in_flight[-1][0] if self.in_flight else None

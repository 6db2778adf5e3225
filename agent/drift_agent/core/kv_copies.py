"""KV block copies between the device pool and the host tier, as the block manager asks for them. Pure: block
ids only; the engine's copier moves the bytes, the simulator charges the time.

Consecutive (source, destination) pairs coalesce into runs, so a sequence whose blocks were handed out as
contiguous groups moves in a few large copies instead of one per block.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["out", "in"]  # out: device -> host, in: host -> device
DIRECTIONS: tuple[Direction, Direction] = ("out", "in")  # a submission's order: every copy out first


def host_blocks_for_budget(gib: float, block_bytes: int) -> int:
    """Host-tier blocks of `block_bytes` in `gib` GiB (`--swap-space-gb`), as the engine and the simulator
    size the tier."""
    if gib < 0 or block_bytes <= 0:
        raise ValueError(f"need gib >= 0 and block bytes > 0, got {gib} and {block_bytes}")
    return int(gib * (1 << 30)) // block_bytes


@dataclass(frozen=True, slots=True)
class CopyRun:
    """`num_blocks` consecutive blocks from `src` on to `dst` on."""

    src: int
    dst: int
    num_blocks: int


def coalesce(pairs: Iterable[tuple[int, int]]) -> list[CopyRun]:
    """(src, dst) block pairs as runs, in order: a pair extends the previous run when both ids follow on."""
    runs: list[CopyRun] = []
    src0 = dst0 = n = -1
    for src, dst in pairs:
        if n > 0 and src == src0 + n and dst == dst0 + n:
            n += 1
            continue
        if n > 0:
            runs.append(CopyRun(src0, dst0, n))
        src0, dst0, n = src, dst, 1
    if n > 0:
        runs.append(CopyRun(src0, dst0, n))
    return runs


_ticket_ids = itertools.count(1)


@dataclass
class KVCopies:
    """One submission of copies, done in order (every copy out before every copy in, so a block copied out
    and promoted back in the same submission is read after it was written). `blocking`: a batch about to run
    reads blocks copied in here, so its forward pass must wait for them; otherwise the copies overlap compute
    and the sequences waiting on them resume once they are done."""

    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    blocking: bool = False
    ticket: int = field(default_factory=lambda: next(_ticket_ids))

    @property
    def is_empty(self) -> bool:
        return not self.swap_out and not self.swap_in

    def runs(self, direction: Direction) -> list[CopyRun]:
        return coalesce(self.swap_out if direction == "out" else self.swap_in)

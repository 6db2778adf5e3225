"""Llumnix-style live migration of running requests between colocated instances.

Trigger (checked at each step boundary of an instance): the instance's load — KV blocks held plus the blocks its
queued prompts will need, over its pool (Llumnix's "virtual usage") — is at least `high_watermark`, and the
least-loaded other instance is at most `low_watermark`. The request moved is the decoding one with the least KV
(cheapest to copy).

Multi-stage pre-copy, as in Llumnix's migration coordinator: the destination first reserves blocks for the
request (plus headroom for tokens generated meanwhile); stage 1 copies its KV while it keeps decoding on the
source; each later stage copies the tokens generated since the previous stage; when what is left fits in
`last_stage_max_blocks` blocks, the source stops the request at its next step boundary and copies the rest —
the only stall the request sees — and the destination adopts it. After `max_stages` stages without converging,
or if the request finishes or is preempted meanwhile, the migration is abandoned and the reservation freed.
Should the destination no longer hold the request at the commit (its sequence slots filled meanwhile), the request
recomputes there as a preempted one would (`Scheduler.requeue`, counted in its preemptions). Copies run at the
cluster's KV bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.sampling_params import SamplingParams
from ..core.sequence import Sequence, SequenceStatus
from .events import COMMIT, STAGE
from .instance import SimInstance
from .presets import kv_transfer_seconds

if TYPE_CHECKING:
    from .cluster import Cluster


@dataclass(frozen=True)
class MigrationConfig:
    high_watermark: float = 0.9
    low_watermark: float = 0.6
    last_stage_max_blocks: int = 16
    max_stages: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.low_watermark < self.high_watermark:
            raise ValueError("migration needs 0 <= low watermark < high watermark")
        if self.last_stage_max_blocks < 0 or self.max_stages < 1:
            raise ValueError("migration: last-stage blocks must be >= 0 and max stages >= 1")


class _Migration:
    __slots__ = ("seq", "src", "dst", "copied", "stage", "reservation", "final_pending", "stopped_at")

    def __init__(self, seq: Sequence, src: SimInstance, dst: SimInstance, reservation: Sequence) -> None:
        self.seq = seq
        self.src = src
        self.dst = dst
        self.copied = seq.num_computed_tokens
        self.stage = 1
        self.reservation = reservation
        self.final_pending = False
        self.stopped_at = 0.0


class Migrator:
    def __init__(self, cluster: Cluster, config: MigrationConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.by_src: dict[int, _Migration] = {}
        self.started = self.committed = self.aborted = self.recomputed = 0
        self.stall_s = 0.0

    def load(self, inst: SimInstance) -> float:
        bm = inst.bm
        used = bm.num_blocks - bm.num_free_blocks
        return (used + bm.blocks_needed(inst.pending_prefill_tokens)) / bm.num_blocks

    def _copy_time(self, tokens: int) -> float:
        c = self.cluster
        return kv_transfer_seconds(tokens, c.kv_bytes_per_token, c.link_bw, c.config.kv_latency_s)

    # ---- hooks from the event loop -----------------------------------------------------------------------
    def at_step_boundary(self, inst: SimInstance, t: float) -> None:
        mig = self.by_src.get(inst.index)
        if mig is None:
            self._maybe_start(inst, t)
        elif mig.final_pending:
            self._final(mig, t)

    def on_event(self, commit: bool, mig: _Migration, t: float) -> None:
        if commit:
            self._commit(mig, t)
        else:
            self._stage(mig, t)

    # ---- protocol ------------------------------------------------------------------------------------------
    def _maybe_start(self, src: SimInstance, t: float) -> None:
        cfg = self.config
        if self.load(src) < cfg.high_watermark:
            return
        others = [i for i in self.cluster.instances if i is not src]
        if not others:
            return
        dst = min(others, key=lambda i: (self.load(i), i.index))
        if self.load(dst) > cfg.low_watermark:
            return
        seqs = [s for s in src.sched.running if not s.in_flight and not s.is_prefilling]
        if not seqs:
            return
        seq = min(seqs, key=lambda s: s.num_computed_tokens)
        bs = dst.bm.block_size
        reservation = Sequence("migration-reservation", [0], SamplingParams(max_tokens=1))
        if not dst.bm.allocate(reservation, seq.num_computed_tokens + cfg.last_stage_max_blocks * bs):
            return
        mig = _Migration(seq, src, dst, reservation)
        self.by_src[src.index] = mig
        self.started += 1
        self.cluster.push(t + self._copy_time(mig.copied), STAGE, mig)

    def _alive(self, mig: _Migration) -> bool:
        seq = mig.seq
        return seq.status is SequenceStatus.RUNNING and seq in mig.src.sched.running

    def _stage(self, mig: _Migration, t: float) -> None:
        if not self._alive(mig):
            self._abort(mig, t)
            return
        delta = mig.seq.num_computed_tokens - mig.copied
        if mig.dst.bm.blocks_needed(delta) <= self.config.last_stage_max_blocks:
            mig.final_pending = True
            if not mig.src.busy:  # else at the source's next step boundary
                self._final(mig, t)
            return
        if mig.stage >= self.config.max_stages:
            self._abort(mig, t)
            return
        mig.copied += delta
        mig.stage += 1
        self.cluster.push(t + self._copy_time(delta), STAGE, mig)

    def _final(self, mig: _Migration, t: float) -> None:
        if not self._alive(mig):
            self._abort(mig, t)
            return
        if mig.src.busy or mig.seq.in_flight:
            return  # at the source's next step boundary (a running step may still emit its token)
        mig.final_pending = False
        mig.src.sched.release(mig.seq)
        mig.stopped_at = t
        self.cluster.push(t + self._copy_time(mig.seq.num_computed_tokens - mig.copied), COMMIT, mig)

    def _commit(self, mig: _Migration, t: float) -> None:
        dst, seq = mig.dst, mig.seq
        dst.bm.free_seq(mig.reservation)
        if dst.sched.adopt(seq):
            self.committed += 1
        else:  # the destination filled up meanwhile: recompute there, as after a preemption
            dst.sched.requeue(seq)
            self.recomputed += 1
        self.stall_s += t - mig.stopped_at
        del self.by_src[mig.src.index]
        self.cluster.wake(dst, t)
        self.cluster.wake(mig.src, t)

    def _abort(self, mig: _Migration, t: float) -> None:
        mig.dst.bm.free_seq(mig.reservation)
        self.aborted += 1
        self.by_src.pop(mig.src.index, None)
        self.cluster.wake(mig.dst, t)

    def stats(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "committed": self.committed,
            "aborted": self.aborted,
            "recomputed": self.recomputed,
            "mean_stall_s": self.stall_s / (self.committed + self.recomputed)
            if self.committed + self.recomputed
            else None,
        }

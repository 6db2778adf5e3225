"""Moves KV blocks between the device KV pool and the host KV tier (swap preemption, the host prefix cache).

The block manager decides which blocks move (`KVCopies`); this module moves the bytes, off the critical path:
on CUDA on a dedicated copy stream, on CPU on one worker thread (torch drops the GIL inside copies, so they
overlap the forward pass on the main thread). Either way submissions run strictly one after another, so a
host block copied out by one submission is read by a later submission's copy in only after it was written.

The caller's side of the contract: a device block copied out must not be rewritten (reallocated) until the
submission is done (`poll` returned it, or `wait`), and a forward pass that reads blocks copied in must be
preceded by `before_forward` of their ticket. All methods are called from one thread (the engine's).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.kv_copies import DIRECTIONS, CopyRun, Direction, KVCopies

log = logging.getLogger(__name__)


def block_nbytes(pool: torch.Tensor) -> int:
    """Bytes of one block of a pool shaped (2, layers, blocks, block_size, kv_heads, head_dim)."""
    return pool[:, :, 0].numel() * pool.element_size()


def allocate_host_pool(device_pool: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A host pool like `device_pool` with `num_blocks` blocks, uninitialised. Pinned when the device pool is
    on CUDA, so copies are true DMA that overlap compute; pageable (with a warning) when pinning fails."""
    shape = (*device_pool.shape[:2], num_blocks, *device_pool.shape[3:])
    if device_pool.is_cuda:
        try:
            return torch.empty(shape, dtype=device_pool.dtype, pin_memory=True)
        except RuntimeError as e:
            log.warning(
                "could not pin %d host KV blocks (%s); using pageable memory, copies won't overlap",
                num_blocks,
                e,
            )
    return torch.empty(shape, dtype=device_pool.dtype)


def _per_direction(factory: Any) -> Any:
    return field(default_factory=lambda: {d: factory() for d in DIRECTIONS})


@dataclass
class CopyStats:
    """Completed copies per direction ("out": device -> host, "in": host -> device). A copy is one run of
    consecutive blocks; `run_sizes` counts runs by their length in blocks. `seconds`: time the copies took
    (CPU: measured by the worker around them; CUDA: between events on the copy stream)."""

    copies: dict[Direction, int] = _per_direction(int)
    blocks: dict[Direction, int] = _per_direction(int)
    bytes: dict[Direction, int] = _per_direction(int)
    seconds: dict[Direction, float] = _per_direction(float)
    run_sizes: dict[Direction, Counter[int]] = _per_direction(Counter)

    def record(self, direction: Direction, runs: list[CopyRun], block_bytes: int, seconds: float) -> None:
        self.copies[direction] += len(runs)
        self.blocks[direction] += sum(r.num_blocks for r in runs)
        self.bytes[direction] += sum(r.num_blocks for r in runs) * block_bytes
        self.seconds[direction] += seconds
        self.run_sizes[direction].update(r.num_blocks for r in runs)

    def rate_gbps(self, direction: Direction) -> float | None:
        """Achieved bandwidth in GB/s; None before anything was copied that way."""
        secs = self.seconds[direction]
        return self.bytes[direction] / secs / 1e9 if self.bytes[direction] and secs > 0 else None


@dataclass
class _Submission:
    runs: dict[Direction, list[CopyRun]]
    future: Future[tuple[float, float]] | None = None  # CPU: the worker's (out, in) seconds
    events: tuple[Any, Any, Any] | None = None  # CUDA: start, between out and in, end
    error: BaseException | None = None  # CUDA: failed while enqueueing

    def done(self) -> bool:
        if self.future is not None:
            return self.future.done()
        return self.events is None or bool(self.events[2].query())

    def exception(self) -> BaseException | None:  # only once done
        return self.future.exception() if self.future is not None else self.error

    def seconds(self) -> tuple[float, float]:
        if self.future is not None:
            return self.future.result()
        assert self.events is not None
        start, mid, end = self.events
        return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3


class KVCopier:
    """Runs `KVCopies` between `kv_pool` (device) and `host_pool` (host), asynchronously and in FIFO order.

    A submission whose copy failed (e.g. a block id out of range: every run is checked before any byte moves)
    is reported once, by whichever of `poll`, `wait` or `before_forward` meets it first, by raising the copy's
    exception; the engine treats that as a failed step. Later submissions are unaffected.
    """

    def __init__(self, kv_pool: torch.Tensor, host_pool: torch.Tensor) -> None:
        if kv_pool.shape[:2] + kv_pool.shape[3:] != host_pool.shape[:2] + host_pool.shape[3:]:
            raise ValueError(
                f"host pool {tuple(host_pool.shape)} does not match KV pool {tuple(kv_pool.shape)}"
            )
        if kv_pool.dtype != host_pool.dtype:
            raise ValueError(f"host pool dtype {host_pool.dtype} != KV pool dtype {kv_pool.dtype}")
        self.kv_pool, self.host_pool = kv_pool, host_pool
        self.cuda = kv_pool.is_cuda
        self.block_bytes = block_nbytes(kv_pool)
        self.stats = CopyStats()
        # (kv, layer) flattened into one dim: a run is then one contiguous chunk per row (a view, never a copy).
        rows = kv_pool.shape[0] * kv_pool.shape[1]
        self._device = kv_pool.view(rows, *kv_pool.shape[2:])
        self._host = host_pool.view(rows, *host_pool.shape[2:])
        self._pending: dict[int, _Submission] = {}  # ticket -> submission, in submission order
        self._closed = False
        self._worker: ThreadPoolExecutor | None = None
        self._stream: Any = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device=kv_pool.device)
        else:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-kv-copy")

    @property
    def pending(self) -> int:
        """Submissions not yet returned by `poll` (nor reported failed)."""
        return len(self._pending)

    # ---- submitting -------------------------------------------------------------------------------------
    def submit(self, copies: KVCopies) -> None:
        """Start the copies of `copies`: all its copies out, then all its copies in, after every earlier
        submission's."""
        if self._closed:
            raise RuntimeError("KVCopier is closed")
        if copies.ticket in self._pending:
            raise ValueError(f"ticket {copies.ticket} is already pending")
        sub = _Submission({d: copies.runs(d) for d in DIRECTIONS})
        if self._worker is not None:
            sub.future = self._worker.submit(self._run_cpu, sub.runs)
        else:
            try:
                self._enqueue_cuda(sub)
            except Exception as e:  # reported like a failed CPU copy: by poll / wait
                sub.error = e
        self._pending[copies.ticket] = sub

    def _check(self, runs: dict[Direction, list[CopyRun]]) -> None:
        n_dev, n_host = self._device.shape[1], self._host.shape[1]
        for d in DIRECTIONS:
            n_src, n_dst = (n_dev, n_host) if d == "out" else (n_host, n_dev)
            for r in runs[d]:
                if min(r.src, r.dst) < 0 or r.src + r.num_blocks > n_src or r.dst + r.num_blocks > n_dst:
                    raise IndexError(
                        f"copy {d} {r} out of range (device pool {n_dev} blocks, host pool {n_host})"
                    )

    @torch.inference_mode()
    def _copy(self, direction: Direction, run: CopyRun) -> None:
        src, dst = (self._device, self._host) if direction == "out" else (self._host, self._device)
        s, d, n = run.src, run.dst, run.num_blocks
        if self.cuda:
            # One contiguous chunk per (kv, layer): torch stages a strided host <-> device copy through a
            # pageable temporary, which blocks the host.
            for i in range(src.shape[0]):
                dst[i, d : d + n].copy_(src[i, s : s + n], non_blocking=True)
        else:
            # numpy's memcpy, not torch's copy_: torch would parallelise it with OpenMP on this worker thread,
            # and a second OpenMP pool in the process slows every forward pass on the main thread. numpy
            # releases the GIL while it copies, so the copy still overlaps the forward pass.
            for i in range(src.shape[0]):
                np.copyto(
                    dst[i, d : d + n].view(torch.uint8).numpy(), src[i, s : s + n].view(torch.uint8).numpy()
                )

    def _run_cpu(self, runs: dict[Direction, list[CopyRun]]) -> tuple[float, float]:
        self._check(runs)
        secs = []
        for d in DIRECTIONS:
            t0 = time.perf_counter()
            for run in runs[d]:
                self._copy(d, run)
            secs.append(time.perf_counter() - t0)
        return secs[0], secs[1]

    def _enqueue_cuda(self, sub: _Submission) -> None:
        self._check(sub.runs)
        events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
        # KV written by forward passes already launched must land before it is copied out.
        self._stream.wait_stream(torch.cuda.current_stream(self.kv_pool.device))
        with torch.cuda.stream(self._stream):
            events[0].record(self._stream)
            for run in sub.runs["out"]:
                self._copy("out", run)
            events[1].record(self._stream)
            for run in sub.runs["in"]:
                self._copy("in", run)
            events[2].record(self._stream)
        sub.events = events

    # ---- completion -------------------------------------------------------------------------------------
    def poll(self) -> list[int]:
        """Tickets of the submissions done since the last call, in submission order; never blocks. A failed
        submission raises its copy's exception instead (when done ones precede it, this call returns those and
        the next call raises)."""
        done: list[int] = []
        for ticket, sub in list(self._pending.items()):
            if not sub.done():
                break
            if sub.exception() is not None:
                if done:
                    break
                self._raise_failed(ticket)
            del self._pending[ticket]
            for d, secs in zip(DIRECTIONS, sub.seconds(), strict=True):
                if sub.runs[d]:
                    self.stats.record(d, sub.runs[d], self.block_bytes, secs)
            done.append(ticket)
        return done

    def wait(self, ticket: int) -> None:
        """Block until submission `ticket` (so every earlier one too) is done; raises if it failed. Unknown or
        already polled tickets return at once."""
        sub = self._pending.get(ticket)
        if sub is None:
            return
        if sub.future is not None:
            wait_futures([sub.future])
        elif sub.events is not None:
            sub.events[2].synchronize()
        if sub.exception() is not None:
            self._raise_failed(ticket)

    def before_forward(self, ticket: int) -> None:
        """Make the next forward pass see the copies of `ticket`. CUDA: the compute stream waits for them
        (the host does not); CPU: `wait`."""
        sub = self._pending.get(ticket)
        if sub is None:
            return
        if sub.events is None:
            self.wait(ticket)
        else:
            torch.cuda.current_stream(self.kv_pool.device).wait_event(sub.events[2])

    def _raise_failed(self, ticket: int) -> None:
        err = self._pending.pop(ticket).exception()
        assert err is not None
        raise err

    def wait_all(self) -> None:
        """Block until every submission is done. Failures are left for `poll` to report."""
        if self._stream is not None:
            self._stream.synchronize()
        else:
            wait_futures([s.future for s in self._pending.values() if s.future is not None])

    def close(self) -> None:
        """Wait for the copies in flight and stop the worker; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.wait_all()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

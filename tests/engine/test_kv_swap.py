"""KV block copies between the device pool and the host tier: contents, FIFO order, run coalescing, stats,
completion (poll / wait / before_forward), failures, and that CPU copies run off the main thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from drift_agent.core.kv_copies import CopyRun, KVCopies, host_blocks_for_budget
from drift_agent.engine.kv_swap import (
    CopyStats,
    KVCopier,
    allocate_host_pool,
    block_nbytes,
)

SHAPE = (2, 3, 16, 4, 2, 8)  # (k/v, layers, blocks, block_size, kv_heads, head_dim)
HOST_BLOCKS = 12


def make_pool(device: str = "cpu", seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(device)


def block(pool: torch.Tensor, b: int) -> torch.Tensor:
    return pool[:, :, b]


@pytest.fixture
def pool() -> torch.Tensor:
    return make_pool()


@pytest.fixture
def copier(pool: torch.Tensor) -> Iterator[KVCopier]:
    c = KVCopier(pool, allocate_host_pool(pool, HOST_BLOCKS))
    yield c
    c.close()


def gate_copies(copier: KVCopier) -> tuple[threading.Event, list[str]]:
    """Make every copy wait for the returned event; the names of the threads the copies ran on."""
    gate, threads = threading.Event(), []
    copy = copier._copy

    def gated(direction, run):  # type: ignore[no-untyped-def]
        assert gate.wait(30), "test gate never opened"
        threads.append(threading.current_thread().name)
        copy(direction, run)

    copier._copy = gated  # type: ignore[method-assign]
    return gate, threads


def run(copier: KVCopier, copies: KVCopies) -> None:
    copier.submit(copies)
    copier.wait(copies.ticket)
    assert copier.poll() == [copies.ticket]


def test_round_trip_restores_blocks(pool: torch.Tensor, copier: KVCopier) -> None:
    original = pool.clone()
    # device 2..4 -> host 0..2 (one run), 7 -> host 5 and 9 -> host 3 (single blocks)
    out = [(2, 0), (3, 1), (4, 2), (7, 5), (9, 3)]
    run(copier, KVCopies(swap_out=out))
    for dev, _ in out:
        pool[:, :, dev] = 0.0  # the device blocks are reused meanwhile
    new_home = {2: 10, 3: 11, 4: 12, 7: 0, 9: 15}
    run(copier, KVCopies(swap_in=[(host, new_home[dev]) for dev, host in out]))
    for dev, _ in out:
        assert torch.equal(block(pool, new_home[dev]), block(original, dev))
    assert torch.equal(block(pool, 5), block(original, 5))  # untouched


def test_later_copy_in_reads_what_an_earlier_copy_out_wrote(pool: torch.Tensor, copier: KVCopier) -> None:
    copier.host_pool[:, :, 5] = -1.0  # stale host content
    first, second = KVCopies(swap_out=[(2, 5)]), KVCopies(swap_in=[(5, 9)])
    copier.submit(first)
    copier.submit(second)  # no wait in between
    copier.wait(second.ticket)
    assert torch.equal(block(pool, 9), block(pool, 2))
    assert copier.poll() == [first.ticket, second.ticket]


def test_within_a_submission_copies_out_go_first(pool: torch.Tensor, copier: KVCopier) -> None:
    copier.host_pool[:, :, 4] = -1.0
    run(copier, KVCopies(swap_out=[(6, 4)], swap_in=[(4, 8)]))
    assert torch.equal(block(pool, 8), block(pool, 6))


def test_runs_coalesce_and_stats_count_them(pool: torch.Tensor, copier: KVCopier) -> None:
    calls: list[tuple[str, CopyRun]] = []
    copy = copier._copy
    copier._copy = lambda d, r: (calls.append((d, r)), copy(d, r))  # type: ignore[method-assign]
    assert copier.stats.rate_gbps("out") is None
    copies = KVCopies(swap_out=[(0, 0), (1, 1), (2, 2), (5, 3), (7, 8)], swap_in=[(0, 10), (1, 11)])
    run(copier, copies)
    assert calls == [
        ("out", CopyRun(0, 0, 3)),
        ("out", CopyRun(5, 3, 1)),
        ("out", CopyRun(7, 8, 1)),
        ("in", CopyRun(0, 10, 2)),
    ]
    bb = block_nbytes(pool)
    assert bb == 3 * 2 * 4 * 2 * 8 * 4
    s = copier.stats
    assert (s.copies["out"], s.blocks["out"], s.bytes["out"]) == (3, 5, 5 * bb)
    assert (s.copies["in"], s.blocks["in"], s.bytes["in"]) == (1, 2, 2 * bb)
    assert s.run_sizes["out"] == {3: 1, 1: 2}
    assert s.run_sizes["in"] == {2: 1}
    for d in ("out", "in"):
        assert s.seconds[d] > 0
        assert s.rate_gbps(d) == pytest.approx(s.bytes[d] / s.seconds[d] / 1e9)

    run(copier, KVCopies(swap_in=[(3, 12)]))  # accumulates; nothing counted out
    assert (s.copies["out"], s.copies["in"], s.blocks["in"]) == (3, 2, 3)
    assert s.run_sizes["in"] == {2: 1, 1: 1}


def test_copy_stats_rate_is_none_without_copies() -> None:
    stats = CopyStats()
    assert stats.rate_gbps("out") is None and stats.rate_gbps("in") is None
    stats.record("in", [CopyRun(0, 0, 2)], 1000, 1e-6)
    assert stats.rate_gbps("in") == pytest.approx(2.0)
    assert stats.rate_gbps("out") is None


def test_poll_does_not_block_and_returns_tickets_in_order(copier: KVCopier) -> None:
    gate, _ = gate_copies(copier)
    subs = [KVCopies(swap_out=[(i, i)]) for i in range(3)]
    for s in subs:
        copier.submit(s)
    assert copier.poll() == []  # the worker is stuck on the first copy
    assert copier.pending == 3
    gate.set()
    copier.wait(subs[-1].ticket)  # the last one done means all are
    assert copier.poll() == [s.ticket for s in subs]
    assert copier.pending == 0
    assert copier.poll() == []


@pytest.mark.parametrize("method", ["wait", "before_forward"])
def test_wait_and_before_forward_block_until_done(pool: torch.Tensor, copier: KVCopier, method: str) -> None:
    gate, threads = gate_copies(copier)
    copies = KVCopies(swap_out=[(3, 1)], swap_in=[(1, 13)])
    copier.submit(copies)
    timer = threading.Timer(0.05, gate.set)
    timer.start()
    getattr(copier, method)(copies.ticket)
    assert len(threads) == 2  # both copies ran
    assert torch.equal(block(pool, 13), block(pool, 3))
    timer.join()
    assert copier.poll() == [copies.ticket]
    # polled and unknown tickets are no-ops
    getattr(copier, method)(copies.ticket)
    getattr(copier, method)(10**9)


def test_empty_submission_completes(copier: KVCopier) -> None:
    copies = KVCopies()
    run(copier, copies)
    assert copier.stats.copies == {"out": 0, "in": 0}


def test_close_waits_and_is_idempotent(pool: torch.Tensor) -> None:
    copier = KVCopier(pool, allocate_host_pool(pool, HOST_BLOCKS))
    gate, _ = gate_copies(copier)
    copies = KVCopies(swap_out=[(0, 0)])
    copier.submit(copies)
    timer = threading.Timer(0.05, gate.set)
    timer.start()
    copier.close()
    timer.join()
    assert copier.poll() == [copies.ticket]  # done by the time close returned
    copier.close()
    with pytest.raises(RuntimeError, match="closed"):
        copier.submit(KVCopies(swap_out=[(1, 1)]))


def test_failed_copy_is_raised_once_and_the_copier_stays_usable(pool: torch.Tensor, copier: KVCopier) -> None:
    copier.host_pool[:, :, 0] = -1.0
    good1 = KVCopies(swap_out=[(1, 1)])
    # a valid copy out next to an invalid copy in: checked before any byte moves, so host block 0 is untouched
    bad = KVCopies(swap_out=[(2, 0)], swap_in=[(1, SHAPE[2])])
    good2 = KVCopies(swap_out=[(3, 2)])
    for c in (good1, bad, good2):
        copier.submit(c)
    copier.wait_all()
    assert copier.poll() == [good1.ticket]  # the ones done before the failure come back first
    with pytest.raises(IndexError, match="out of range"):
        copier.poll()
    assert copier.poll() == [good2.ticket]
    assert bool((copier.host_pool[:, :, 0] == -1.0).all())
    assert copier.stats.copies["out"] == 2  # the failed submission is not counted

    bad = KVCopies(swap_out=[(0, HOST_BLOCKS + 5)])
    copier.submit(bad)
    with pytest.raises(IndexError):
        copier.wait(bad.ticket)
    assert copier.pending == 0  # reported by wait, so not again by poll
    assert copier.poll() == []

    ok = KVCopies(swap_out=[(4, 3)], swap_in=[(3, 14)])
    run(copier, ok)
    assert torch.equal(block(pool, 14), block(pool, 4))


def test_copies_run_on_the_worker_thread_while_the_main_thread_computes(
    pool: torch.Tensor, copier: KVCopier
) -> None:
    gate, threads = gate_copies(copier)
    copies = KVCopies(swap_out=[(0, 0), (1, 1), (5, 6)])
    copier.submit(copies)
    x = torch.randn(64, 64)
    y = x @ x  # torch work on the main thread while the copy is in flight
    assert copier.poll() == []
    gate.set()
    copier.wait(copies.ticket)
    assert y.shape == (64, 64)
    assert len(threads) == 2  # two runs
    assert all(name.startswith("drift-kv-copy") for name in threads)
    assert threading.current_thread().name not in threads


def test_allocate_host_pool_and_budget(pool: torch.Tensor) -> None:
    host = allocate_host_pool(pool, 5)
    assert host.shape == (2, 3, 5, 4, 2, 8)
    assert host.dtype == pool.dtype and host.device.type == "cpu"
    assert not host.is_pinned()  # only pinned for CUDA pools
    half = allocate_host_pool(pool.half(), 0)
    assert half.shape[2] == 0 and half.dtype == torch.float16

    assert host_blocks_for_budget(0, 4096) == 0
    assert host_blocks_for_budget(1, 1 << 20) == 1024
    assert host_blocks_for_budget(0.5, 3 << 20) == 170
    with pytest.raises(ValueError):
        host_blocks_for_budget(-1, 4096)
    with pytest.raises(ValueError):
        host_blocks_for_budget(1, 0)


def test_mismatched_host_pool_is_rejected(pool: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="does not match"):
        KVCopier(pool, torch.empty(2, 2, 4, 4, 2, 8))
    with pytest.raises(ValueError, match="dtype"):
        KVCopier(pool, allocate_host_pool(pool.half(), 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_round_trip_on_the_copy_stream() -> None:
    pool = make_pool("cuda")
    original = pool.clone()
    host = allocate_host_pool(pool, HOST_BLOCKS)
    assert host.is_pinned()
    copier = KVCopier(pool, host)
    pool.mul_(2.0)  # queued on the compute stream: the copy out must see it
    out = KVCopies(swap_out=[(2, 0), (3, 1), (4, 2), (9, 7)])
    copier.submit(out)
    copier.wait(out.ticket)
    assert torch.equal(host[:, :, 0:3], (original * 2)[:, :, 2:5].cpu())
    back = KVCopies(swap_in=[(0, 10), (1, 11), (2, 12), (7, 0)], blocking=True)
    copier.submit(back)
    copier.before_forward(back.ticket)  # the compute stream now reads the copied blocks
    assert torch.equal(pool[:, :, 10:13], (original * 2)[:, :, 2:5])
    assert torch.equal(pool[:, :, 0], (original * 2)[:, :, 9])
    copier.wait_all()
    assert copier.poll() == [out.ticket, back.ticket]
    s = copier.stats
    assert (s.copies["out"], s.blocks["out"], s.copies["in"], s.blocks["in"]) == (2, 4, 2, 4)
    assert s.rate_gbps("out") is not None and s.rate_gbps("in") is not None

    bad = KVCopies(swap_out=[(0, HOST_BLOCKS)])
    copier.submit(bad)
    with pytest.raises(IndexError):
        copier.poll()
    copier.close()
    copier.close()

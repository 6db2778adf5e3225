"""CUDA graphs for decode steps: one graph per (stream, batch-size bucket), replayed over static input buffers.

A decode step launches hundreds of small kernels whose launch cost exceeds their run time at small batches;
replaying a captured graph launches them all at once. As in vLLM and SGLang, batch sizes are rounded up to a
few buckets (see `capture_sizes`), padded rows copy row 0 (same token, position, slot and table: they
write the same K/V bytes to the same slot, so padding cannot corrupt the pool), and outputs are sliced back.

Graphs are captured per stream as well (SGLang's PD-multiplexing mode captures per green-context partition):
the multiplexed engine runs its decode lane on the current split's stream, and kernels chosen at capture
(cuBLAS heuristics, split counts) depend on the SMs that stream's partition has.

`capture_all` captures every bucket up front (at engine start, and for each partition's decode stream when
the multiplexed executor starts), so no step pays for a capture; its warm-up runs write their dummy K/V to
slot 0, saved and restored around them. A bucket not captured yet is captured at first use, with the step's
real inputs already in the static buffers, so the warm-up run writes exactly the K/V the step itself writes.
A failed capture turns graphs off with a logged reason.

Only attention backends whose decode plan reads nothing from the host but the batch size can be captured
(`cuda_graph_decode`; today the Triton backend); others run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..models.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


class Graph(Protocol):
    def replay(self) -> None: ...


# (forward over the static buffers, stream to capture on or None) -> (graph, its static output)
Capture = Callable[[Callable[[], torch.Tensor], Any], tuple[Graph, torch.Tensor]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets up to (and including) max_num_seqs: 1, 2, 4, 8, 16, 24, 32, then every 16 to 128,
    then every 32. Coarser than vLLM's every-8 ladder: 17 graphs for 256 sequences instead of 35, per stream;
    a large decode step reads the weights once whatever its rows, so padding it by up to 1/4 costs little."""
    ladder = [1, 2, 4, 8, 16, 24, *range(32, 128, 16), *range(128, max_num_seqs, 32)]
    return [*(s for s in ladder if s < max_num_seqs), max_num_seqs]


def unsupported_reason(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why decode steps of `model` cannot be captured on `device`; None when they can."""
    if device.type != "cuda":
        return f"device is {device.type}, not cuda"
    backend = getattr(model, "attn_backend", None)
    if not getattr(backend, "cuda_graph_decode", False):
        name = getattr(backend, "name", type(backend).__name__)
        return f"attention backend {name} plans decode on the host (not capturable); use --attention-backend triton"
    return None


class EagerGraph:
    """Stand-in for a CUDA graph (tests, CPU): capture runs the callable once, replay reruns it into the same
    output tensor. It reruns the plan too, so it catches a plan that reads stale host values of the buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.output = fn()
        self.replays = 0

    def replay(self) -> None:
        self.output.copy_(self.fn())
        self.replays += 1


def eager_capture(fn: Callable[[], torch.Tensor], stream: Any) -> tuple[Graph, torch.Tensor]:
    graph = EagerGraph(fn)
    return graph, graph.output


class DecodeGraphs:
    """Captures and replays `model`'s decode forward (to final hidden states; the LM head runs eagerly on the
    rows that sample). `run` returns None for a step it does not cover, and the caller runs eagerly."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        block_size: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        capture: Capture | None = None,
        kv_pool: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool  # (2, layers, blocks, block_size, kv heads, head dim): for capture_all
        self.device = device
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self._capture = capture or self._cuda_capture
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[Any, int], tuple[Graph, torch.Tensor]] = {}
        self.disabled: str | None = None  # why graphs were turned off after a failure
        self._pool: Any = None  # one memory pool for all graphs: decode steps never overlap each other

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured size that holds `num_seqs` rows; None when larger than every bucket."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def covers(self, meta: AttentionMetadata) -> bool:
        return (
            self.disabled is None
            and meta.num_seqs > 0
            and meta.is_decode_only
            and meta.num_seqs <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    @torch.inference_mode()
    def capture_all(self, stream: Any = None) -> int:
        """Capture every bucket not captured yet on `stream` (None: the default stream's graphs); returns how
        many. The dummy rows (token 0 at position 0, one block: block 0) write their K/V to slot 0 during the
        warm-up runs: its contents are saved first and restored after, so live sequences are unaffected."""
        if self.disabled is not None or self.kv_pool is None:
            return 0
        key = (
            None
            if stream is None or (self.device.type == "cuda" and stream == torch.cuda.default_stream())
            else stream
        )
        todo = [size for size in self.sizes if (key, size) not in self.graphs]
        if not todo:
            return 0
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing else may read slot 0 meanwhile
        saved = self.kv_pool[:, :, 0, 0].clone()
        for buf in (self.input_ids, self.positions, self.slot_mapping, self.block_tables):
            buf.zero_()
        self.seq_lens.fill_(1)
        captured = 0
        for size in todo:
            if self._capture_bucket((key, size), size) is None:
                break
            captured += 1
        self.kv_pool[:, :, 0, 0].copy_(saved)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) on stream %s in %.1f s",
            captured, todo[0], todo[-1], "default" if key is None else key, time.perf_counter() - started,
        )  # fmt: skip
        return captured

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Hidden states [B, hidden] of a decode step by graph replay, or None when the step is not covered
        (not decode-only, too large, graphs disabled) or capture failed."""
        if not self.covers(meta):
            return None
        num = meta.num_seqs
        size = self.bucket(num)
        assert size is not None
        self._load(input_ids, positions, meta, size)
        key = (self._stream_key(), size)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture_bucket(key, size)
            if entry is None:
                return None
        graph, hidden = entry
        graph.replay()
        return hidden[:num]

    def _load(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int
    ) -> None:
        num, width = meta.num_seqs, meta.block_tables.shape[1]
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(positions)
        self.slot_mapping[:num].copy_(meta.slot_mapping)
        self.seq_lens[:num].copy_(meta.seq_lens)
        # Columns past `width` keep older block ids: never read past a row's length (the torch decode path
        # gathers and then masks them; any in-range id will do).
        self.block_tables[:num, :width].copy_(meta.block_tables)
        if size > num:
            pad = size - num
            for buf in (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_tables):
                buf[num:size].copy_(buf[:1].expand(pad, *buf.shape[1:]))

    def _static_forward(self, size: int) -> Callable[[], torch.Tensor]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            # Host copies only tell the plan the batch shape; a capturable plan reads lengths on the device.
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[1] * size,
            block_size=self.block_size,
        )
        ids, pos = self.input_ids[:size], self.positions[:size]

        def forward() -> torch.Tensor:
            return self.model(ids, pos, meta)

        return forward

    def _capture_bucket(self, key: tuple[Any, int], size: int) -> tuple[Graph, torch.Tensor] | None:
        stream = key[0] if isinstance(key[0], torch.cuda.Stream) else None
        try:
            entry = self._capture(self._static_forward(size), stream)
        except Exception as exc:  # any capture failure: serve eagerly rather than fail the step
            self.disabled = f"capture of batch size {size} failed: {type(exc).__name__}: {exc}"
            log.warning("CUDA graphs turned off, decode runs eagerly: %s", self.disabled)
            self.graphs.clear()
            return None
        self.graphs[key] = entry
        log.debug("captured decode graph for batch size %d on stream %s", size, key[0])
        return entry

    def _stream_key(self) -> Any:
        """The current stream when it is a side stream (a partition's), else None (captured on torch's own)."""
        if self.device.type != "cuda":
            return None
        current = torch.cuda.current_stream(self.device)
        return None if current == torch.cuda.default_stream(self.device) else current

    def _cuda_capture(self, fn: Callable[[], torch.Tensor], stream: Any) -> tuple[Graph, torch.Tensor]:
        # Warm up on the capture stream first: Triton compiles and cuBLAS allocates its workspace outside capture.
        side = stream or torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: host threads preparing grammar masks may touch CUDA meanwhile; only this thread's
        # calls must not break the capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()
        self._pool = graph.pool()
        return graph, out

"""Real latency measurements for `drift profile`: the engine's own forward passes on synthetic batches of a
given shape, on the streams (GPU) or threads (CPU) of a split. KV contents are irrelevant to timing, so the
batches attend over freshly allocated (uninitialised) blocks, which are returned afterwards."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..core.sampling_params import SamplingParams
from ..core.scheduler import Batch, ScheduledSeq
from ..core.sequence import Sequence
from ..partition.base import Partitioner, Split


class EngineMeasurer:
    def __init__(self, engine, partitioner: Partitioner, seed: int = 0) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.bm = engine.block_manager
        self.partitioner = partitioner
        self.vocab = engine.runner.model.vocab_size
        self.rng = random.Random(seed)
        self.cuda = engine.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1) if not self.cuda else None

    @contextmanager
    def _batch(self, shapes: list[tuple[int, int]], phase: str) -> Iterator[Batch]:
        """shapes: (new tokens, cached tokens) per sequence."""
        seqs, items = [], []
        try:
            for new, cached in shapes:
                toks = [self.rng.randrange(self.vocab) for _ in range(new + cached)]
                seq = Sequence(f"profile-{len(seqs)}", toks, SamplingParams(max_tokens=1))
                if not self.bm.allocate(seq, new + cached):
                    raise ValueError(f"KV pool too small to measure {len(shapes)}x{new + cached} tokens")
                seqs.append(seq)
                items.append(ScheduledSeq(seq, cached, new))
            yield Batch(items, phase)  # type: ignore[arg-type]
        finally:
            for seq in seqs:
                self.bm.free_seq(seq)

    def _time(self, batch: Batch, stream) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            self.runner.forward_logits(batch)
            return time.perf_counter() - t0
        stream = stream or torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            self.runner.forward_logits(batch)
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def prefill(self, new: int, cached: int, split: Split) -> float:
        with self._batch([(new, cached)], "prefill") as batch:
            return self._time(batch, self.partitioner.streams_for(split)[0])

    def _decode_shapes(self, batch_size: int, kv_tokens: int) -> list[tuple[int, int]]:
        per = max(kv_tokens // batch_size, 1)
        return [(1, per - 1)] * batch_size

    def decode(self, batch_size: int, kv_tokens: int, split: Split) -> float:
        with self._batch(self._decode_shapes(batch_size, kv_tokens), "decode") as batch:
            return self._time(batch, self.partitioner.streams_for(split)[1])

    def concurrent(
        self, split: Split, prefill: tuple[int, int], decode: tuple[int, int]
    ) -> tuple[float, float, float, float]:
        """(prefill alone, prefill beside decode, decode alone, decode beside prefill) on `split`."""
        p_stream, d_stream = self.partitioner.streams_for(split)
        with (
            self._batch([prefill], "prefill") as pb,
            self._batch(self._decode_shapes(*decode), "decode") as db,
        ):
            p_alone, d_alone = self._time(pb, p_stream), self._time(db, d_stream)
            if self.cuda:
                # Decode steps are short: repeat them for as long as the prefill runs, report their mean.
                p_start, p_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(p_stream):
                    p_start.record(p_stream)
                    self.runner.forward_logits(pb)
                    p_end.record(p_stream)
                d_times = []
                while not p_end.query() or not d_times:
                    d_times.append(self._time(db, d_stream))
                p_end.synchronize()
                return p_alone, p_start.elapsed_time(p_end) / 1e3, d_alone, sum(d_times) / len(d_times)
            future = self._pool.submit(self._time, pb, None)
            d_times = []
            while not future.done() or not d_times:
                d_times.append(self._time(db, None))
            return p_alone, future.result(), d_alone, sum(d_times) / len(d_times)

"""Runs scheduled batches through the model over the paged KV pool and samples the next tokens.

Owns the device state: weights, the KV pool tensors, per-request RNGs. Everything about *which* tokens run
comes from the scheduler's `Batch`; this module only turns it into flat tensors.
"""

from __future__ import annotations

import logging
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..core.errors import is_fatal_error
from ..core.scheduler import Batch
from ..core.sequence import Sequence
from ..models.attention_metadata import AttentionMetadata
from .cuda_graphs import Capture, DecodeGraphs, unsupported_reason
from .sampler import Sampler, SampleRequest, TokenLogprobs
from .structured import MaskBatch, StructuredOutputs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_GB = 2.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


@dataclass
class StepResult:
    """Sampled token and its logprobs per sequence id, for the items of a batch that sample."""

    tokens: dict[int, int]
    logprobs: dict[int, TokenLogprobs]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        # Sequences whose own sampling setup (seeding, ...) failed in `sample`: they got no token, and the
        # engine fails them alone. A side list rather than a `StepResult` field, because the multiplexed
        # executor samples through `sample` too and hands back only the tokens.
        self.failed: list[tuple[Sequence, Exception]] = []
        # Grammar masks of structured outputs (set by the engine, which has the tokenizer), and the masks in
        # flight per batch: started before its forward pass, taken when it samples.
        self.structured: StructuredOutputs | None = None
        self._mask_jobs: dict[int, Future] = {}
        shape = (2, model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=dtype, device=device)
        model.bind_kv_cache([(self.kv_pool[0, i], self.kv_pool[1, i]) for i in range(model.num_layers)])
        self.graphs: DecodeGraphs | None = None  # set by enable_cuda_graphs()

    def enable_cuda_graphs(
        self, max_num_seqs: int, max_model_len: int, capture: Capture | None = None
    ) -> str | None:
        """Replay decode steps from CUDA graphs; returns why not (and leaves them off), or None when on.
        `capture` replaces CUDA capture (tests run the same buffers and padding on CPU with a stand-in)."""
        if capture is None:
            reason = unsupported_reason(self.model, self.device)
            if reason is not None:
                return reason
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.device, self.block_size, max_num_seqs, max_blocks, capture, self.kv_pool
        )
        return None

    # ---- inputs ---------------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat inputs of a batch. Returns (input_ids, positions, metadata, logits rows), the logits rows in the
        order of the batch's sampling items.

        Tokens are laid out multi-token chunks first, then single-token (decode) items by context length,
        longest first: the attention backend pads decodes of similar length together, and with this order
        each such group is a run of consecutive rows it can slice instead of gathering and scattering.
        """
        bs = self.block_size
        items = batch.items
        order = sorted(range(len(items)), key=lambda k: (items[k].num_new_tokens == 1, -items[k].end))
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        last_row: dict[int, int] = {}
        for k in order:
            item = items[k]
            seq, start, end = item.seq, item.start, item.end
            table = seq.block_table
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            q_lens.append(end - start)
            seq_lens.append(end)
            tables.append(table)
            last_row[k] = len(ids) - 1
        logits_rows = [last_row[k] for k, item in enumerate(items) if item.samples]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) if len(t) < width else t for t in tables]
        dev = self.device
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return input_ids, pos_t, meta, logits_rows

    # ---- execution -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        self.start_masks(batch)
        try:
            input_ids, positions, meta, rows = self.prepare(batch)
            hidden = None if self.graphs is None else self.graphs.run(input_ids, positions, meta)
            if hidden is None:
                hidden = self.model(input_ids, positions, meta)
            if not rows:
                return hidden.new_empty((0, 0))
            return self.model.compute_logits(hidden[rows])
        except BaseException:
            self._drop_masks(id(batch))  # this batch will never sample
            raise

    def start_masks(self, batch: Batch) -> None:
        """Start computing the grammar masks of the batch's structured rows, to overlap the forward pass."""
        if self.structured is None:
            return
        sampling = [i.seq for i in batch.items if i.samples]
        job = self.structured.start_masks(sampling, self.device)
        if job is not None:
            key = id(batch)
            self._mask_jobs[key] = job
            # A batch whose step failed between its forward pass and its sampling (the multiplexed lanes)
            # takes its masks along when it is freed: its id, the key, can only be reused after that, so no
            # later batch ever samples with another batch's masks.
            weakref.finalize(batch, self._drop_masks, key, job)

    def _drop_masks(self, key: int, job: Future | None = None) -> None:
        """Forget the pending masks under `key` (only `job`'s, when given)."""
        pending = self._mask_jobs.get(key)
        if pending is not None and (job is None or pending is job):
            self._mask_jobs.pop(key, None)
            pending.cancel()  # not started yet: never runs

    def clear_masks(self) -> None:
        """Forget every pending mask (after a failed step: the batches in flight never sample)."""
        for key in list(self._mask_jobs):
            self._drop_masks(key)

    def _take_masks(self, batch: Batch, sampling: list[Sequence]) -> MaskBatch | None:
        job = self._mask_jobs.pop(id(batch), None)
        if job is None and self.structured is not None:  # not started with the forward (a prefill block)
            job = self.structured.start_masks(sampling, self.device)
        if job is None:
            return None
        masks: MaskBatch = job.result()
        self.failed.extend(masks.failed)  # a grammar that failed for its sequence fails that request alone
        return masks

    @torch.inference_mode()
    def execute(self, batch: Batch) -> StepResult:
        logits = self.forward_logits(batch)
        try:
            return self.sample(batch, logits)
        except BaseException:
            # Failed before taking them, and the step's error (its traceback) may keep the batch alive.
            self._drop_masks(id(batch))
            raise

    def sample(self, batch: Batch, logits: torch.Tensor) -> StepResult:
        """Sample the next token of every item whose chunk reached the end of its known tokens."""
        sampling = [i.seq for i in batch.items if i.samples]
        if not sampling:
            return StepResult({}, {})
        masks = self._take_masks(batch, sampling)
        requests: list[SampleRequest] = []
        failed_rows: list[int] = []
        for row, seq in enumerate(sampling):
            try:
                requests.append(self._sample_request(seq))
            except Exception as exc:  # this request's own setup: it fails alone, the batch samples on
                if is_fatal_error(exc):
                    raise
                self.failed.append((seq, exc))
                failed_rows.append(row)
        if failed_rows:
            keep = [row for row in range(len(sampling)) if row not in failed_rows]
            sampling = [sampling[row] for row in keep]
            if not sampling:
                return StepResult({}, {})
            logits = logits[keep]
            if masks is not None:
                masks = masks.select(keep)
        token_mask = None if masks is None or masks.empty else (masks.rows, masks.disallowed)
        # (Two arguments when no row has a grammar: the sampler seen by callers and tests is unchanged.)
        result = (
            self.sampler(logits.float(), requests)
            if token_mask is None
            else self.sampler(logits.float(), requests, token_mask)
        )
        tokens = {seq.seq_id: tok for seq, tok in zip(sampling, result.token_ids, strict=True)}
        logprobs = {
            seq.seq_id: lp for seq, lp in zip(sampling, result.logprobs, strict=True) if lp is not None
        }
        return StepResult(tokens, logprobs)

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """The sequences whose sampling setup failed since the last call (see `failed`)."""
        failed, self.failed = self.failed, []
        return failed

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        params = seq.params
        gen = None
        if params.seed is not None and not params.greedy:
            gen = self.generators.get(seq.seq_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed)
                self.generators[seq.seq_id] = gen
        suppress: frozenset[int] = frozenset()
        # With a grammar, the grammar decides where the output ends (suppressing the EOS it demands would
        # leave a row with no allowed token).
        if seq.num_output_tokens < params.min_tokens and params.structured is None:
            suppress = frozenset(params.stop_token_ids) | (
                frozenset() if params.ignore_eos else seq.eos_token_ids
            )
        return SampleRequest(
            params=params,
            token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            generator=gen,
            suppress_token_ids=suppress,
        )

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        if self.structured is not None:
            self.structured.release(seq_id)


def num_kv_blocks_for_budget(
    budget_bytes: float, block_size: int, per_token_bytes: int, max_useful_tokens: int
) -> int:
    """Blocks that fit the byte budget, capped at what max_num_seqs full-length sequences could ever use."""
    by_budget = int(budget_bytes // (per_token_bytes * block_size))
    cap = -(-max_useful_tokens // block_size)
    return max(1, min(by_budget, cap))


def gpu_kv_budget_bytes(device: torch.device, utilization: float, activation_reserve: int) -> int:
    """What is left for KV under `utilization` of the whole device, after weights and a reserve for
    activations measured on a profile run."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * utilization) - used - activation_reserve)

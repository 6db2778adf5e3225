"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, token masks per step.

Why llguidance: its masks are computed on the fly by a Rust token-trie walk (tens of microseconds per
sequence on CPU, no per-grammar precompilation of the whole vocabulary), it drops the GIL while it works,
it ships as one dependency-free abi3 wheel, and it supports JSON schema, full regexes (no look-around),
Lark grammars and GBNF (converted). xgrammar needs tvm-ffi and triton next to it and precompiles an
adaptive token mask per grammar, which pays off on GPUs with repeated schemas rather than on a CPU.

Flow: the server validates a request by compiling its grammar (`compile`: a 400 naming the field when it
cannot), cached as a template matcher that every sequence deep-copies. Each step the runner asks for the
masks of the sampling rows that carry a grammar (`start_masks`) on a worker thread while the model runs the
forward pass, the sampler applies them to those rows only, and the engine advances each matcher with the
tokens the sequence actually kept (`advance`): matcher state follows the sequence's tokens, not the step, so
preemption, recompute and the multiplexed lanes need nothing special.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections import abc as cabc  # not `Sequence`: that name is the engine's sequence class here
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..core.errors import InvalidRequestError
from ..core.sampling_params import StructuredOutput
from ..core.sequence import Sequence

log = logging.getLogger(__name__)

# Compact JSON (", " and ": " separators, no free whitespace): a model, a small one above all, given free
# whitespace can emit newlines until max_tokens instead of closing the object.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept (LRU)

State = Literal["running", "stopped", "error"]


def compile_error(so: StructuredOutput, msg: str) -> InvalidRequestError:
    err = InvalidRequestError(f"{so.param or 'structured'}: {msg}")
    err.param = so.param  # type: ignore[attr-defined]  # the server's 400 names the request field
    return err


def grammar_of(so: StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) of a structured output; raises InvalidRequestError."""
    import llguidance

    LLMatcher = llguidance.LLMatcher
    so.validate()
    # vLLM's whitespace pattern (outlines' meaning): bare `,` / `:` with the pattern around every structural
    # character; it wins over the schema's own `x-guidance`.
    overrides = (
        None
        if so.whitespace_pattern is None
        else {"item_separator": ",", "key_separator": ":", "whitespace_pattern": so.whitespace_pattern}
    )
    if so.kind == "json":
        return LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=JSON_OPTIONS, overrides=overrides
        )
    if so.kind == "json_schema":
        try:
            return LLMatcher.grammar_from_json_schema(so.spec, defaults=JSON_OPTIONS, overrides=overrides)
        except (ValueError, TypeError) as exc:
            raise compile_error(so, f"invalid JSON schema: {exc}") from None
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        # Lark string literals take JSON escapes, so any choice text is spelled exactly.
        alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.spec)
        return LLMatcher.grammar_from_lark(f"start: {alts}\n")
    text = so.spec
    if "::=" in text:  # GBNF (what vLLM's xgrammar backend takes); llguidance speaks Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as exc:
            raise compile_error(so, f"cannot read the GBNF grammar: {exc}") from None
    return LLMatcher.grammar_from_lark(text)


def whitespace_pattern_error(pattern: Any) -> str | None:
    """Why `pattern` cannot be a JSON whitespace pattern (llguidance's regex dialect), None when it can."""
    import llguidance

    if not isinstance(pattern, str) or not pattern:
        return "must be a non-empty string"
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_regex(pattern))
    return " ".join(error.split()) or None


def cache_key(so: StructuredOutput) -> str:
    spec = [so.kind, so.spec] if so.whitespace_pattern is None else [so.kind, so.spec, so.whitespace_pattern]
    return json.dumps(spec, sort_keys=True, ensure_ascii=False, default=str)


@dataclass
class _SeqMatcher:
    matcher: Any  # llguidance.LLMatcher
    consumed: int = 0  # output tokens of the sequence the matcher has consumed


@dataclass
class MaskBatch:
    """Masks for some rows of a step's logits: `disallowed[j]` is True where row `rows[j]` must not go."""

    rows: torch.Tensor  # long [R], indices into the step's sampling rows
    disallowed: torch.Tensor  # bool [R, V]
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # sequences whose matcher failed

    @property
    def empty(self) -> bool:
        return self.rows.numel() == 0

    def select(self, keep: list[int]) -> MaskBatch:
        """The masks after the sampling rows were narrowed to `keep` (row indices, ascending)."""
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [(j, new_index[r]) for j, r in enumerate(self.rows.tolist()) if r in new_index]
        dev = self.rows.device
        sel = torch.tensor([j for j, _ in pairs], dtype=torch.long, device=self.disallowed.device)
        rows = torch.tensor([r for _, r in pairs], dtype=torch.long, device=dev)
        return MaskBatch(rows, self.disallowed.index_select(0, sel), self.failed)


def unpack_disallowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [R, vocab_size], True where the packed allowed-bits (int32 [R, ceil(V / 32)], token t at bit
    t % 32 of word t // 32) are 0. Runs on the bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: `& 1` still reads bit 31 right
    return (bits == 0).reshape(bitmask.shape[0], -1)[:, :vocab_size]


class StructuredOutputs:
    """Compiled-grammar cache, per-sequence matchers and the step's masks for one engine."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lltok: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.matchers: dict[int, _SeqMatcher] = {}
        # One thread: masks of a step are computed while the forward pass runs (both release the GIL);
        # llguidance's own executor spreads the rows of a big batch over cores.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="drift-masks")
        self._executor: Any = None

    # ---- compiling ----------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
            return self._lltok

    def compile(self, so: StructuredOutput) -> Any:
        """The template matcher of `so` (cached); raises InvalidRequestError (with `param`) when the grammar
        cannot compile. Safe from any thread; drops the GIL while llguidance builds it."""
        import llguidance

        key = cache_key(so)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        lltok = self._tokenizer()
        grammar = grammar_of(so)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise compile_error(so, f"cannot compile the {kind_name(so)}: {matcher.get_error().strip()}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    # ---- per sequence -------------------------------------------------------------------------
    def _matcher(self, seq: Sequence) -> _SeqMatcher:
        state = self.matchers.get(seq.seq_id)
        if state is None:
            # Templates are never advanced, so concurrent deep copies of one are safe.
            state = _SeqMatcher(self.compile(seq.params.structured).deep_copy())
            self.matchers[seq.seq_id] = state
        return state

    def advance(self, seq: Sequence) -> State:
        """Bring the matcher to the sequence's output tokens (rolling back any it no longer has)."""
        state = self._matcher(seq)
        m = state.matcher
        n_out = seq.num_output_tokens
        if n_out < state.consumed:
            m.rollback(state.consumed - n_out)
            state.consumed = n_out
        if n_out > state.consumed:
            m.consume_tokens(seq.token_ids[seq.num_prompt_tokens + state.consumed :])
            state.consumed = n_out
        if m.is_error():
            return "error"
        return "stopped" if m.is_stopped() else "running"

    def error(self, seq: Sequence) -> str:
        state = self.matchers.get(seq.seq_id)
        return state.matcher.get_error() if state is not None else ""

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    # ---- masks --------------------------------------------------------------------------------
    def start_masks(self, seqs: cabc.Sequence[Sequence], device: torch.device) -> Future | None:
        """Masks for the rows of `seqs` (the sampling rows, in order) with a grammar, computed on the worker
        thread; None when no row has one."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return None
        return self._worker.submit(self.masks, [seqs[i] for i in rows], rows, device)

    def masks(self, seqs: list[Sequence], rows: list[int], device: torch.device) -> MaskBatch:
        import llguidance

        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(seqs), words), -1, dtype=torch.int32)  # rows left as is allow everything
        pairs: list[tuple[Any, int]] = []
        failed: list[tuple[Sequence, Exception]] = []
        for j, seq in enumerate(seqs):
            try:
                state = self.advance(seq)
            except Exception as exc:  # this sequence's grammar alone: it fails, the batch samples on
                failed.append((seq, exc))
                continue
            if state == "running":
                pairs.append((self.matchers[seq.seq_id].matcher, j))
            else:  # the engine ends it after this step; until then any EOS will do
                bitmask[j] = 0
        if len(pairs) == 1:
            matcher, j = pairs[0]
            matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), words * 4)
        elif pairs:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(seqs))
        packed = bitmask.numpy().view(np.uint32)
        # A row with nothing allowed (an error state) gets EOS, so sampling stays defined.
        live = packed.copy()
        if self.vocab_size % 32:  # bits past the vocabulary do not count
            live[:, -1] &= np.uint32((1 << (self.vocab_size % 32)) - 1)
        dead = ~live.any(axis=1)
        if dead.any():
            for t in self.eos_token_ids:
                if t < self.vocab_size:
                    packed[dead, t // 32] |= np.uint32(1 << (t % 32))
        # Packed bits cross to the device (a 32nd of a bool mask) and are unpacked there.
        return MaskBatch(
            torch.tensor(rows, dtype=torch.long, device=device),
            unpack_disallowed(bitmask.to(device, non_blocking=True), self.vocab_size),
            failed,
        )

    def close(self) -> None:
        self._worker.shutdown(wait=False)


def kind_name(so: StructuredOutput) -> str:
    return {
        "json": "JSON grammar",
        "json_schema": "JSON schema",
        "regex": "regex",
        "choice": "choice",
        "grammar": "grammar",
    }[so.kind]

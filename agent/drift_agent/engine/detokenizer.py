"""Incremental detokenization with stop strings, O(1) work per token.

Decoding follows vLLM's prefix/read-offset scheme on token ids: each step decodes only a short window
``ids[prefix_offset:]`` and diffs it against ``ids[prefix_offset:read_offset]``, so context-dependent
decoders (byte-level BPE, SentencePiece's leading-space handling) give the same text as a full decode.
A window whose text ends in U+FFFD is an incomplete UTF-8 character (byte-level BPE splits them across
tokens): its tokens stay pending until a later token completes the character.

Known divergences from ``tokenizer.decode(output_ids)``, all shared with vLLM: the first output token is
decoded after the prompt's last tokens, so a SentencePiece leading space that continues the prompt is
kept; an *invalid* byte run under tokenizers' ByteFallback decoder (one U+FFFD per byte in a full decode)
keeps the characters already streamed; the slow-tokenizer ``clean_up_tokenization_spaces`` pass is skipped.

Stop strings are searched only in the newly decoded text plus the ``max(len(stop)) - 1`` characters before
it. Text is kept in an ``io.StringIO`` so appends, truncation and reading the unreleased tail are all
proportional to the new text, not to the length of the output.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from ..core.sampling_params import SamplingParams

# Prompt tokens decoded as left context of the first output token (vLLM uses 5-7).
_PROMPT_CONTEXT = 6
# Tokens left pending (text ending in U+FFFD) before they are released anyway: a UTF-8 character needs
# at most 4 bytes, so only an invalid byte stream from the model gets here; it bounds the window.
_MAX_PENDING = 16
# Trim consumed ids once this many sit before the window, so memory stays bounded by the window.
_COMPACT_AT = 256

_REPLACEMENT = "\ufffd"


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The fastest exact ``ids -> text`` the tokenizer offers (the Rust backend when there is one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    # A slow (Python) tokenizer: skip the clean-up pass, which no incremental scheme can reproduce.
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text as they arrive, and watches for stop strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._decode = _decoder(tokenizer, params.skip_special_tokens)
        # Window state: ids[prefix_offset:read_offset] is text already emitted (the left context),
        # ids[read_offset:] are tokens whose text is not complete yet.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), lazily

        self._stop = list(params.stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._include_stop = params.include_stop_str_in_output
        # Streamed text must never contain the start of a stop string that will be cut off later.
        self._hold = self._max_stop - 1 if self._stop and not self._include_stop else 0
        self._min_tokens = params.min_tokens

        self._text = io.StringIO()
        self._len = 0  # characters in _text
        self._released = 0  # characters handed out by take_delta
        self._num_output_tokens = 0
        self._finished = False

    # ---- public API ----------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """All text decoded so far (complete characters only until finished; includes any held tail)."""
        return self._text.getvalue()

    @property
    def is_finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: Sequence[int], *, stop_terminated: bool = False) -> str | None:
        """Append new output tokens; returns the stop string that matched (the text is then truncated).

        ``stop_terminated``: the last token ended the sequence as EOS or a stop token id; as in vLLM its text
        is left out unless ``include_stop_str_in_output``. Updates after a stop match are ignored.
        """
        if self._finished or not new_token_ids:
            return None
        to_decode = list(new_token_ids)
        if stop_terminated and not self._include_stop:
            to_decode.pop()
        check_from = self._len  # stop strings must end in text added after this offset
        for token_id in to_decode:
            delta = self._step(token_id)
            self._num_output_tokens += 1
            if delta:
                self._append(delta)
            if self._num_output_tokens <= self._min_tokens:
                check_from = self._len  # vLLM: text of the first min_tokens tokens cannot stop
        self._num_output_tokens += len(new_token_ids) - len(to_decode)
        if not self._stop or self._len <= check_from:
            return None
        match = self._find_stop(check_from)
        if match is None:
            return None
        stop_str, truncate_to = match
        self._text.truncate(truncate_to)
        self._len = truncate_to
        self._released = min(self._released, truncate_to)
        self._finished = True
        return stop_str

    def take_delta(self) -> str:
        """Text added since the last call, minus a tail that could still begin a stop string."""
        end = self._len if self._finished else self._len - self._hold
        if end <= self._released:
            return ""
        self._text.seek(self._released)
        delta = self._text.read(end - self._released)
        self._released = end
        return delta

    def finish(self) -> None:
        """The sequence ended for another reason: release pending bytes (as U+FFFD) and the held tail."""
        if self._finished:
            return
        if self._read_offset < len(self._ids):
            new_text = self._decode(self._ids[self._prefix_offset :])
            prefix_text = self._window_prefix_text()
            if len(new_text) > len(prefix_text):
                self._append(new_text[len(prefix_text) :])
        self._finished = True

    # ---- internals -----------------------------------------------------------------------------

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text

    def _step(self, token_id: int) -> str:
        """Add one token to the window; return the text it completes ('' while a character is partial)."""
        ids = self._ids
        ids.append(token_id)
        prefix_text = self._window_prefix_text()
        new_text = self._decode(ids[self._prefix_offset :])
        pending = len(ids) - self._read_offset
        if new_text == prefix_text and pending == 1 and self._read_offset > self._prefix_offset:
            # A token that adds no text (a skipped special token): drop it so runs of them cannot
            # grow the window; with a non-empty left context its absence changes nothing.
            ids.pop()
            return ""
        if (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)) and pending < _MAX_PENDING:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self._prefix_text = None
        if self._prefix_offset >= _COMPACT_AT:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _append(self, text: str) -> None:
        self._text.seek(self._len)
        self._text.write(text)
        self._len += len(text)

    def _find_stop(self, check_from: int) -> tuple[str, int] | None:
        """Earliest-ending stop string that ends after ``check_from``; returns it and where to cut."""
        start = max(0, check_from - self._max_stop + 1)
        self._text.seek(start)
        tail = self._text.read()
        best: tuple[int, int, str] | None = None  # (end, begin, stop string) relative to tail
        for stop in self._stop:
            idx = tail.find(stop, max(0, check_from - start - len(stop) + 1))
            if idx == -1:
                continue
            candidate = (idx + len(stop), idx, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, begin, stop = best
        return stop, start + (end if self._include_stop else begin)

"""Prompt text of a requested token length.

With a tokenizer (`TokenizerPrompts`), lengths are exact as vLLM's random data set makes them: sample non-special
token ids, decode, re-encode, then truncate or pad with fresh ids and retry, because N decoded tokens do not always
re-encode to N tokens. Without one (`WordPrompts`), prompts are random common English words, each of which is a
single token (with its leading space) in the BPE vocabularies of the usual chat models, so lengths are close.
Random content keeps prompts from sharing prefixes by accident; shared prefixes come only from `prefix=`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

# Short, frequent words: one BPE token each (with a leading space) in GPT-2, LLaMA, Qwen and SmolLM vocabularies.
_WORD_TEXT = """the of and to in is was for on are with as at be by this had not but from or have an they which one you
    were her all she there would their we him been has when who will more no if out so said what up its about
    into than them can only other new some could time these two may then do first any my now such like our over
    man me even most made after also did many before must through back years where much your way well down
    should because each just those people how too little state good very make world still own see men work long
    get here between both life being under never day same another know while last might us great old year off
    come since against go came right used take three small house few place water big hand high keep light left
    page set play run home read line name word went city tree land cross boy farm hard start story saw far sea
    draw late part open seem next white begin walk paper group music low hear air away watch help turn real
    side color food sun four cold tell show north south east west fire king road rain wind ship blue green"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


class PromptBuilder(Protocol):
    def build(self, n_tokens: int, rng: np.random.Generator, prefix: str = "") -> str:
        """Text of about n_tokens tokens in total (exactly, given a tokenizer) that starts with `prefix`."""
        ...

    def count(self, text: str) -> int:
        """Token count of arbitrary text (exact with a tokenizer, estimated without)."""
        ...


class WordPrompts:
    """Prompts of random common words; one word counts as one token."""

    def build(self, n_tokens: int, rng: np.random.Generator, prefix: str = "") -> str:
        head = prefix.split()
        body = rng.choice(len(WORDS), size=max(0, n_tokens - len(head)))
        return " ".join([*head, *(WORDS[i] for i in body)])

    def count(self, text: str) -> int:
        # ~4 characters per token is the usual English BPE rule of thumb; exact counts need --tokenizer.
        return max(1, math.ceil(len(text) / 4)) if text else 0


class TokenizerPrompts:
    """Prompts with exact token counts for a Hugging Face tokenizer (anything with encode/decode/vocab_size)."""

    def __init__(self, tokenizer: Any, max_retry: int = 10) -> None:
        self.tokenizer = tokenizer
        self.max_retry = max_retry
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        # vLLM samples every non-special id; we also drop ids that do not decode to text on their own (lone
        # UTF-8 continuation bytes of byte-level BPEs), which decode to U+FFFD and re-encode longer.
        ids = [i for i in range(tokenizer.vocab_size) if i not in special]
        texts = tokenizer.batch_decode([[i] for i in ids])
        allowed = np.array([i for i, t in zip(ids, texts, strict=True) if t.strip() and "\ufffd" not in t])
        self.allowed = allowed if len(allowed) else np.arange(tokenizer.vocab_size)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def build(self, n_tokens: int, rng: np.random.Generator, prefix: str = "") -> str:
        ids = self._encode(prefix)[:n_tokens] if prefix else []
        ids += self.allowed[rng.integers(0, len(self.allowed), size=n_tokens - len(ids))].tolist()
        text = self.tokenizer.decode(ids)
        for _ in range(self.max_retry):
            ids = self._encode(text)
            if len(ids) == n_tokens:
                break
            if len(ids) > n_tokens:
                ids = ids[:n_tokens]
            else:
                ids += self.allowed[rng.integers(0, len(self.allowed), size=n_tokens - len(ids))].tolist()
            text = self.tokenizer.decode(ids)
        return text

    def count(self, text: str) -> int:
        return len(self._encode(text))


def load_tokenizer(path: str) -> Any:
    """A local Hugging Face tokenizer: a directory (AutoTokenizer) or a tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return AutoTokenizer.from_pretrained(path)

"""Incremental detokenization: equality with a full decode, UTF-8 safety, stop strings, hold-back, cost."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import CORPUS, make_tokenizer

TEXTS = [
    "Hello world, the café is open.",
    "日本語のテキストです。東京は日本の首都です。",
    "Emoji: 🙂🚀✨🐍 and 👍🏽 — “quotes”…",
    "naïve résumé über straße: Zürich théâtre",
    "mixed 日本 café 🐍 text\nwith a newline\r\nand tabs\t!",
]


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The project's tiny byte-level BPE (GPT-2/Llama-3/Qwen style): multi-byte chars span tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("bytelevel"))))


@pytest.fixture(scope="module")
def metaspace() -> Any:
    """A SentencePiece-style BPE (Llama-2/Mistral): '▁' spaces, <0xXX> byte fallback, leading-space strip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # A small alphabet leaves CJK and emoji to the <0xXX> byte-fallback tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], limit_alphabet=30, show_progress=False
    )
    tok.train_from_iterator([CORPUS] * 2, trainer=trainer)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    for text in ("日", "🐍", "é"):
        assert fast.convert_ids_to_tokens(fast.encode(text))[-1].startswith("<0x")
    return fast


def stream(
    tok: Any,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunks: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed `output` in chunks (default one token each), collecting take_delta after every update."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas: list[str] = []
    stop = None
    i, sizes = 0, iter(chunks or [])
    while i < len(output) and stop is None:
        n = max(1, next(sizes, 1))
        stop = detok.update(output[i : i + n])
        i += n
        deltas.append(detok.take_delta())
    detok.finish()
    deltas.append(detok.take_delta())
    return detok, deltas, stop


# ---- equality with a full decode -----------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    ids=st.lists(st.integers(0, 511), max_size=40),
    skip=st.booleans(),
    prompt_text=st.sampled_from(["", "Hello", "東京は", "<|im_start|>assistant\n"]),
    chunks=st.lists(st.integers(1, 4), max_size=40),
)
def test_random_ids_match_full_decode_bytelevel(
    bytelevel: Any, ids: list[int], skip: bool, prompt_text: str, chunks: list[int]
) -> None:
    prompt = bytelevel.encode(prompt_text)
    detok, deltas, _ = stream(bytelevel, prompt, ids, SamplingParams(skip_special_tokens=skip), chunks)
    expected = bytelevel.decode(ids, skip_special_tokens=skip)
    assert detok.output_text == expected
    assert "".join(deltas) == expected


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    pieces=st.lists(st.one_of(st.integers(0, 299), st.sampled_from(list("日本🐍éß—x "))), max_size=30),
    skip=st.booleans(),
)
def test_random_ids_match_full_decode_metaspace(metaspace: Any, pieces: list[int | str], skip: bool) -> None:
    # Random non-byte tokens, and <0xXX> runs only as whole characters: tokenizers' ByteFallback decoder
    # turns an *invalid* byte run into one U+FFFD per byte, which no streaming decoder can anticipate.
    ids = [i for p in pieces for i in ([p] if isinstance(p, int) else metaspace.encode(p))]
    detok, deltas, _ = stream(metaspace, [], ids, SamplingParams(skip_special_tokens=skip))
    expected = metaspace.decode(ids, skip_special_tokens=skip)
    assert detok.output_text == expected == "".join(deltas)


def test_many_random_sequences_match(bytelevel: Any) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(bytelevel)) for _ in range(rng.randrange(1, 60))]
        detok, _, _ = stream(bytelevel, bytelevel.encode("The"), ids, SamplingParams())
        assert detok.output_text == bytelevel.decode(ids, skip_special_tokens=True)


def test_metaspace_keeps_the_space_that_continues_the_prompt(metaspace: Any) -> None:
    prompt = metaspace.encode("The capital")
    output = metaspace.encode("The capital of France")[len(prompt) :]
    detok, deltas, _ = stream(metaspace, prompt, output, SamplingParams())
    assert detok.output_text == " of France"
    assert "".join(deltas) == " of France"


# ---- UTF-8 safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_without_replacement_chars(bytelevel: Any, metaspace: Any, text: str) -> None:
    for tok in (bytelevel, metaspace):
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        pieces = []
        for t in ids:
            detok.update([t])
            assert "\ufffd" not in detok.output_text
            pieces.append(detok.take_delta())
            assert "\ufffd" not in pieces[-1]
        detok.finish()
        pieces.append(detok.take_delta())
        assert "".join(pieces) == detok.output_text == tok.decode(ids, skip_special_tokens=True)
    assert bytelevel.decode(bytelevel.encode(text)) == text


def test_bytelevel_actually_splits_characters(bytelevel: Any) -> None:
    """The UTF-8 tests above are only meaningful if some token holds part of a character."""
    ids = bytelevel.encode("🙂🐍日本語")
    assert any("\ufffd" in bytelevel.decode([i]) for i in ids)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    text=st.text(
        alphabet=st.one_of(
            st.sampled_from(list("abc ,.\n日本語🙂🚀éüß—")),
            st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
        ),
        max_size=30,
    )
)
def test_any_text_round_trips_one_token_at_a_time(bytelevel: Any, text: str) -> None:
    ids = bytelevel.encode(text)
    detok, deltas, _ = stream(bytelevel, [], ids, SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == text


def test_incomplete_character_is_released_by_finish(bytelevel: Any) -> None:
    ids = bytelevel.encode("ok 🐍")
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams())
    detok.update(ids[:-1])  # the snake's last byte is missing
    assert detok.output_text in ("ok", "ok ")  # the space may share a token with the first byte
    detok.finish()
    assert detok.output_text == bytelevel.decode(ids[:-1]) and detok.output_text.endswith("\ufffd")


# ---- stop strings ------------------------------------------------------------------------------


def expected_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: the occurrence that ends first (then begins first) stops the text."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    end, begin, s = min(found)
    return text[: end if include else begin], s


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    text=st.sampled_from(TEXTS + [CORPUS[:300]]),
    spans=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 6)), min_size=1, max_size=3),
    extra=st.sampled_from([[], ["zzz"], ["🐍 t"]]),
    include=st.booleans(),
    chunks=st.lists(st.integers(1, 3), max_size=30),
)
def test_stop_strings_match_reference(
    bytelevel: Any,
    text: str,
    spans: list[tuple[int, int]],
    extra: list[str],
    include: bool,
    chunks: list[int],
) -> None:
    stops = [text[a % len(text) : a % len(text) + n] for a, n in spans] + extra
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok, deltas, matched = stream(bytelevel, bytelevel.encode("Q:"), bytelevel.encode(text), params, chunks)
    want_text, want_stop = expected_stop(text, stops, include)
    assert (detok.output_text, matched) == (want_text, want_stop)
    assert "".join(deltas) == want_text  # released text was never retracted


def test_stop_string_spanning_tokens_is_excluded_and_held_back(bytelevel: Any) -> None:
    text = "The capital of France is Paris. Berlin is"
    ids = bytelevel.encode(text)
    stop = "Paris."
    assert stop not in [bytelevel.decode([i]) for i in ids]
    assert any(
        stop not in bytelevel.decode(ids[:j]) and stop in bytelevel.decode(ids[: j + 1])
        for j in range(len(ids))
    )
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=[stop, "zzzz"]))
    released = ""
    for t in ids:
        matched = detok.update([t])
        released += detok.take_delta()
        # Never stream text that could still be the start of a stop string.
        assert not released.endswith(("P", "Pa", "Par", "Pari", "Paris"))
        assert "Paris" not in released
        if matched:
            break
    assert matched == stop and detok.is_finished
    assert detok.output_text == "The capital of France is "
    assert released == "The capital of France is "
    # Ignored once stopped.
    assert detok.update(bytelevel.encode(" more")) is None
    assert detok.output_text == "The capital of France is "


def test_include_stop_str_in_output(bytelevel: Any) -> None:
    ids = bytelevel.encode("one, two, three, four")
    params = SamplingParams(stop=["three", "two"], include_stop_str_in_output=True)
    detok, deltas, matched = stream(bytelevel, [], ids, params)
    assert matched == "two"
    assert detok.output_text == "".join(deltas) == "one, two"


def test_multibyte_stop_string(bytelevel: Any) -> None:
    ids = bytelevel.encode("東京は日本の首都です。")
    detok, deltas, matched = stream(bytelevel, [], ids, SamplingParams(stop=["首都"]))
    assert matched == "首都" and detok.output_text == "".join(deltas) == "東京は日本の"


def test_stop_strings_ignored_within_min_tokens(bytelevel: Any) -> None:
    text = "ab ab ab ab ab"
    ids = bytelevel.encode(text)
    first_ab_tokens = next(j for j in range(1, len(ids) + 1) if "ab" in bytelevel.decode(ids[:j]))
    params = SamplingParams(stop=["ab"], min_tokens=first_ab_tokens, max_tokens=100)
    detok, _, matched = stream(bytelevel, [], ids, params)
    assert matched == "ab"
    assert detok.output_text.startswith("ab") and len(detok.output_text) > 0
    assert detok.output_text == text[: text.index("ab", len(bytelevel.decode(ids[:first_ab_tokens])))]


def test_stop_terminated_token_text_is_left_out(bytelevel: Any) -> None:
    im_end = bytelevel.convert_tokens_to_ids("<|im_end|>")
    ids = bytelevel.encode("Hi there") + [im_end]
    for include, want in ((False, "Hi there"), (True, "Hi there<|im_end|>")):
        params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(bytelevel, [], params)
        detok.update(ids[:-1])
        detok.update(ids[-1:], stop_terminated=True)
        detok.finish()
        assert detok.output_text == want


def test_skip_special_tokens(bytelevel: Any) -> None:
    ids = bytelevel.encode("<|im_start|>assistant\nHello<|im_end|>")
    shown, _, _ = stream(bytelevel, [], ids, SamplingParams(skip_special_tokens=False))
    hidden, _, _ = stream(bytelevel, [], ids, SamplingParams(skip_special_tokens=True))
    assert shown.output_text == "<|im_start|>assistant\nHello<|im_end|>"
    assert hidden.output_text == "assistant\nHello"


def test_take_delta_holds_back_possible_stop_prefix_until_finish(bytelevel: Any) -> None:
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["END!"]))
    detok.update(bytelevel.encode("value EN"))
    assert detok.take_delta() == "value"
    assert detok.take_delta() == ""
    detok.finish()
    assert detok.take_delta() == " EN"
    assert detok.output_text == "value EN"


# ---- cost --------------------------------------------------------------------------------------


def test_work_per_token_is_bounded(bytelevel: Any) -> None:
    """Each decode call sees a short window and the stop search a short tail, however long the output."""
    rng = random.Random(1)
    text = " ".join(rng.choice(TEXTS) for _ in range(150))
    ids = bytelevel.encode(text)
    special = bytelevel.convert_tokens_to_ids("<|im_end|>")
    ids = ids[:500] + [special] * 300 + ids[500:]  # a run of skipped tokens must not grow the window
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(bytelevel, bytelevel.encode("x"), SamplingParams(stop=["never-there"]))
    windows: list[int] = []
    inner = detok._decode
    detok._decode = lambda w: windows.append(len(w)) or inner(w)  # type: ignore[method-assign]
    reads: list[int] = []

    class SpyIO(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            out = super().read(size)
            reads.append(len(out))
            return out

    detok._text = SpyIO()
    for t in ids:
        detok.update([t])
        detok.take_delta()
    assert max(windows) <= 24
    assert max(reads) <= 60
    assert len(detok._ids) <= 300
    detok.finish()
    assert detok.output_text == bytelevel.decode(ids, skip_special_tokens=True) == text


def test_tokenizers_tokenizer_is_accepted(bytelevel: Any) -> None:
    ids = bytelevel.encode("café 🙂")
    detok, _, _ = stream(bytelevel.backend_tokenizer, [], ids, SamplingParams())
    assert detok.output_text == "café 🙂"

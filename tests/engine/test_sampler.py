"""Sampler semantics: greedy fast path, filters, penalties, suppression, seeding, logprobs, distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from drift_agent.core.sampling_params import SamplingParams
from drift_agent.engine.sampler import (
    Sampler,
    SampleRequest,
    apply_penalties,
    apply_suppression,
    apply_top_k_top_p,
)

V = 64


def req(
    prompt: int = 3, output: list[int] | None = None, seed: int | None = None, **kw: object
) -> SampleRequest:
    params = SamplingParams(seed=seed, **kw)  # type: ignore[arg-type]
    prompt_ids = list(range(prompt))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRequest(params, prompt_ids + list(output or []), len(prompt_ids), gen)


def rand_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def frequencies(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab)


def assert_matches(counts: np.ndarray, probs: np.ndarray) -> None:
    """Chi-square goodness of fit over the tokens with non-zero probability (nothing else may appear)."""
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    probs = probs.astype(np.float64)
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


# ---- greedy ------------------------------------------------------------------------------------


def test_greedy_fast_path_is_argmax_and_leaves_logits_untouched() -> None:
    logits = rand_logits(32)
    before = logits.clone()
    out = Sampler()(logits, [req(temperature=0.0, top_k=5, top_p=0.5) for _ in range(32)])
    assert out.token_ids == before.argmax(-1).tolist()
    assert out.logprobs == [None] * 32
    assert torch.equal(logits, before)


def test_greedy_fast_path_accepts_bfloat16() -> None:
    logits = rand_logits(4).bfloat16()
    assert Sampler()(logits, [req(temperature=0.0)] * 4).token_ids == logits.float().argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    logits = rand_logits(50, seed=1)
    expected = logits.argmax(-1).tolist()
    torch.manual_seed(0)
    assert Sampler()(logits.clone(), [req(top_k=1, temperature=1.5) for _ in range(50)]).token_ids == expected
    assert (
        Sampler()(logits.clone(), [req(top_p=1e-6, temperature=1.5) for _ in range(50)]).token_ids == expected
    )
    both = [req(top_k=3, top_p=1e-6) for _ in range(50)]
    assert Sampler()(logits.clone(), both).token_ids == expected


def test_mixed_greedy_and_random_rows() -> None:
    logits = rand_logits(40, seed=2)
    expected = logits.argmax(-1).tolist()
    requests = [req(temperature=0.0) if i % 2 == 0 else req(temperature=1.0, top_k=2) for i in range(40)]
    out = Sampler()(logits.clone(), requests).token_ids
    top2 = logits.topk(2, dim=-1).indices.tolist()
    for i, tok in enumerate(out):
        if i % 2 == 0:
            assert tok == expected[i]
        else:
            assert tok in top2[i]


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(rand_logits(2), [req()])
    assert Sampler()(torch.empty(0, V), []).token_ids == []


# ---- seeding -----------------------------------------------------------------------------------


def test_seeded_row_is_independent_of_batch_mates() -> None:
    row = rand_logits(1, seed=3, scale=1.0)  # flat enough that different draws differ

    def run(mates: int, mate_kw: dict[str, object], steps: int = 20) -> list[int]:
        seeded = req(seed=1234, temperature=0.9, top_p=0.95)
        others = [req(**mate_kw) for _ in range(mates)]  # type: ignore[arg-type]
        torch.manual_seed(mates)  # the global RNG differs run to run
        picks = []
        for _ in range(steps):
            batch = others[: mates // 2] + [seeded] + others[mates // 2 :]
            logits = torch.cat(
                [rand_logits(mates // 2, seed=7), row, rand_logits(mates - mates // 2, seed=8)]
            )
            picks.append(Sampler()(logits, batch).token_ids[mates // 2])
        return picks

    alone = run(0, {})
    assert len(set(alone)) > 3, "the row should be genuinely random"
    assert run(5, {"temperature": 1.3}) == alone
    assert run(8, {"temperature": 0.0}) == alone
    assert run(3, {"top_k": 4, "min_p": 0.1, "presence_penalty": 0.5, "logprobs": 2}) == alone
    other_seed = [Sampler()(row.clone(), [req(seed=99, temperature=0.9, top_p=0.95)]).token_ids[0]]
    other_seed += [Sampler()(row.clone(), [req(seed=s, temperature=0.9)]).token_ids[0] for s in range(20)]
    assert len(set(other_seed)) > 1


def test_seeded_generator_advances_between_steps() -> None:
    r = req(seed=5)
    logits = torch.zeros(1, V)
    picks = [Sampler()(logits.clone(), [r]).token_ids[0] for _ in range(30)]
    assert len(set(picks)) > 10  # uniform over 64 tokens: the same draw repeated would be one value


# ---- distributions -----------------------------------------------------------------------------


def sample_many(logits_row: torch.Tensor, n: int, **kw: object) -> list[int]:
    torch.manual_seed(1)
    logits = logits_row.expand(n, -1).clone()
    return Sampler()(logits, [req(**kw)] * n).token_ids  # type: ignore[arg-type]


def test_sampling_matches_softmax_with_temperature() -> None:
    row = rand_logits(1, vocab=12, seed=4, scale=1.0)
    for temp in (0.5, 1.0, 2.0):
        counts = frequencies(sample_many(row, 8000, temperature=temp), 12)
        assert_matches(counts, torch.softmax(row[0] / temp, -1).numpy())


def test_top_k_renormalises_over_the_k_best() -> None:
    row = rand_logits(1, vocab=12, seed=5, scale=1.0)
    probs = torch.softmax(row[0], -1).numpy()
    keep = np.argsort(-probs)[:4]
    expected = np.zeros_like(probs)
    expected[keep] = probs[keep]
    assert_matches(frequencies(sample_many(row, 8000, top_k=4), 12), expected)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    row = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    # Mass before each token: 0, .4, .7, .85, .95 -> with p=0.8 the first three survive.
    counts = frequencies(sample_many(row, 8000, top_p=0.8), 5)
    assert_matches(counts, np.array([0.4, 0.3, 0.15, 0.0, 0.0]))


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    row = torch.log(torch.tensor([[0.5, 0.26, 0.24, 0.0, 0.0]]).clamp(min=1e-9))
    # min_p=0.5 -> threshold 0.25: token 2 (0.24) is dropped, token 1 (0.26) stays.
    counts = frequencies(sample_many(row, 8000, min_p=0.5), 5)
    assert_matches(counts, np.array([0.5, 0.26, 0.0, 0.0, 0.0]))


def test_filters_apply_after_temperature() -> None:
    row = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    # T=0.5 squares the odds: [.36,.09,.01]/.46 -> masses before: 0, .78, .98; top_p=0.9 keeps two.
    counts = frequencies(sample_many(row, 8000, temperature=0.5, top_p=0.9), 3)
    assert_matches(counts, np.array([0.36, 0.09, 0.0]))


# ---- top-k / top-p helper ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.lists(
        st.tuples(
            st.lists(st.floats(-5, 5, allow_nan=False), min_size=8, max_size=8, unique=True),
            st.integers(1, 9),
            st.sampled_from([0.05, 0.3, 0.6, 0.9, math.inf]),
        ),
        min_size=1,
        max_size=5,
    ),
    use_k=st.booleans(),
)
def test_top_k_top_p_keeps_the_reference_set(data: list[tuple[list[float], int, float]], use_k: bool) -> None:
    logits = torch.tensor([d[0] for d in data], dtype=torch.float64)
    ks = torch.tensor([min(d[1], 8) for d in data])
    ps = torch.tensor([d[2] for d in data], dtype=torch.float64)
    use_p = bool((ps < math.inf).any())
    out = logits.clone()
    apply_top_k_top_p(out, ks if use_k else None, ps if use_p else None)
    for row, (values, k, p) in zip(out, data, strict=True):
        order = np.argsort(values)[::-1]
        kept = order[: min(k, 8)] if use_k else order
        probs = np.exp(np.array(values)[kept] - max(values))
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        nucleus = set(kept[before < p - 1e-9].tolist()) if use_p else set(kept.tolist())
        assert set(torch.isfinite(row).nonzero().flatten().tolist()) == nucleus


def test_top_k_rows_without_top_k_stay_whole() -> None:
    logits = rand_logits(3, vocab=10, seed=11)
    out = logits.clone()
    apply_top_k_top_p(out, torch.tensor([2, 10, 5]), None)
    assert torch.isfinite(out).sum(-1).tolist() == [2, 10, 5]
    assert torch.equal(out[1], logits[1])
    kept = torch.isfinite(out[2]).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(logits[2].topk(5).indices.tolist())


# ---- penalties and suppression -------------------------------------------------------------------


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, output = [0, 1], [2, 2, 3]
    r = SampleRequest(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt + output,
        len(prompt),
        None,
    )
    apply_penalties(logits, [r])
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied; presence/frequency do not see the prompt
        0.5 / 2 - 0.5 - 0.25 * 2,  # output twice
        3.0 / 2 - 0.5 - 0.25,  # output once
        -2.0,
        1.0,
    ]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_only_touch_rows_that_ask_and_ignore_out_of_vocab_ids() -> None:
    logits = rand_logits(3, vocab=8)
    before = logits.clone()
    rows = [
        req(),
        SampleRequest(SamplingParams(frequency_penalty=1.0), [0, 5, 99, -1, 5], 1, None),
        req(),
    ]
    apply_penalties(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    expected = before[1].clone()
    expected[5] -= 2.0
    assert torch.allclose(logits[1], expected)


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    r = SampleRequest(SamplingParams(temperature=0.0, frequency_penalty=1.0), [2, 0], 1, None)
    assert Sampler()(logits, [r]).token_ids == [1]


def test_min_tokens_suppression() -> None:
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.5]]).repeat(200, 1)
    eos, stop = 0, 2
    greedy = SampleRequest(SamplingParams(temperature=0.0), [1], 1, None, frozenset({eos, stop, 10**6}))
    assert Sampler()(logits[:1].clone(), [greedy]).token_ids == [1]
    random = [SampleRequest(SamplingParams(), [1], 1, None, frozenset({eos, stop})) for _ in range(200)]
    torch.manual_seed(0)
    picks = set(Sampler()(logits.clone(), random).token_ids)
    assert picks <= {1, 3} and picks == {1, 3}


def test_apply_suppression_sets_minus_inf() -> None:
    logits = torch.zeros(2, 4)
    apply_suppression(logits, [SampleRequest(SamplingParams(), [], 0, None, frozenset({1, 3, 7})), req()])
    assert logits[0].tolist() == [0.0, -math.inf, 0.0, -math.inf]
    assert logits[1].tolist() == [0.0] * 4


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_raw_and_ranked() -> None:
    logits = rand_logits(6, seed=9)
    raw = torch.log_softmax(logits, -1)
    requests = [
        req(temperature=0.0, logprobs=3),
        req(logprobs=5, temperature=0.7, top_k=10),
        req(logprobs=0, repetition_penalty=1.5, output=[1, 2, 3]),  # penalties must not leak into logprobs
        req(),  # no logprobs requested
        req(logprobs=20, top_p=0.5),
        req(temperature=0.0, logprobs=1, presence_penalty=2.0, output=[int(logits[5].argmax())]),
    ]
    out = Sampler()(logits.clone(), requests)
    assert out.logprobs[3] is None
    for i, lp in enumerate(out.logprobs):
        if lp is None:
            continue
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(raw[i, tok].item(), abs=1e-5)
        assert lp.rank == int((raw[i] > raw[i, tok]).sum()) + 1
        n = requests[i].params.logprobs
        top_vals, top_ids = raw[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-5)
    assert out.logprobs[0].rank == 1
    # Penalised away from the raw argmax: the chosen token's raw rank is no longer 1.
    assert out.logprobs[5].rank > 1

"""Next-token selection for a batch of logit rows, with vLLM semantics.

Order per row: grammar mask (structured outputs, only the rows that have one) -> penalties -> min_tokens
suppression -> (greedy: argmax) -> temperature -> top-k -> top-p
-> min-p -> sample. Logprobs are those of the *raw* model distribution (log_softmax of the logits before
any penalty, suppression or temperature), like vLLM V1's default ``logprobs_mode="raw_logprobs"``.

Sampling is an exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. picks token i with
probability ``probs[i] / sum(probs)``, so filtered distributions need no renormalisation. Rows with their
own generator draw their ``E`` row alone from it, so a seeded request reproduces whatever shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """One row of the logits and what is needed to sample it."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    suppress_token_ids: frozenset[int] = frozenset()  # e.g. EOS + stop ids while below min_tokens

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits is the whole answer."""
        p = self.params
        return p.greedy and p.logprobs is None and not self.suppress_token_ids and not p.needs_penalties


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # rank of the chosen token in the raw distribution (1 = most likely)
    top: list[tuple[int, float]]  # the params.logprobs most likely tokens, best first


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


class Sampler:
    """Stateless; callable on a [S, V] logits tensor and S requests. Modifies ``logits`` in place."""

    def __call__(
        self,
        logits: torch.Tensor,
        requests: list[SampleRequest],
        token_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SampleResult:
        """`token_mask`: (rows [R] long, disallowed [R, V] bool), the grammar masks of the rows with a
        structured output; the other rows are untouched."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(requests)} requests")
        if not requests:
            return SampleResult([], [])
        raw_logprobs = None
        if token_mask is not None:
            logits = logits.float()
            # Logprobs stay those of the raw distribution: taken before the mask edits the rows.
            raw_logprobs = self._raw_logprobs(logits, requests)
            apply_token_mask(logits, *token_mask)
        # Hot path of decode benchmarks: one kernel, one device->host copy, no per-row tensor work.
        if all(r.plain_greedy for r in requests):
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(requests))

        if token_mask is None:
            logits = logits.float()
            raw_logprobs = self._raw_logprobs(logits, requests)
        apply_penalties(logits, requests)
        apply_suppression(logits, requests)

        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            chosen = logits.argmax(dim=-1)
        elif any(greedy):
            # Argmax first: sampling edits the logits in place.
            argmax = logits.argmax(dim=-1)
            chosen = torch.where(
                torch.tensor(greedy, device=logits.device), argmax, self._sample(logits, requests)
            )
        else:
            chosen = self._sample(logits, requests)
        token_ids = chosen.tolist()
        return SampleResult(token_ids, self._gather_logprobs(raw_logprobs, token_ids, requests))

    # ---- processing ----------------------------------------------------------------------------

    @staticmethod
    def _raw_logprobs(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor | None:
        """log_softmax of the untouched rows that asked for logprobs (taken before in-place edits)."""
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if not rows:
            return None
        return torch.log_softmax(logits[torch.tensor(rows, device=logits.device)], dim=-1)

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        """Random sample for every row (greedy rows get T=1 and are overridden by the caller)."""
        dev, vocab = logits.device, logits.shape[1]
        params = [r.params for r in requests]
        temps = [1.0 if p.greedy else p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            logits.div_(torch.tensor(temps, device=dev).unsqueeze(1))

        # Disabled rows get k = V / p = inf so one vectorised pass is a no-op for them.
        want_k = any(0 < p.top_k < vocab for p in params)
        want_p = any(p.top_p < 1.0 for p in params)
        if want_k or want_p:
            ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
            ps = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev)
            apply_top_k_top_p(logits, ks if want_k else None, ps if want_p else None)

        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p
            probs = probs.masked_fill(probs < threshold, 0.0)

        # E = -log(U), U ~ U[0, 1): Exp(1) that is never 0 (a 0 would win whatever its probability) and
        # about 3x cheaper than Tensor.exponential_ on CPU.
        race = torch.rand_like(probs)
        for i, r in enumerate(requests):
            if r.generator is not None and not r.params.greedy:
                race[i].uniform_(generator=r.generator)
        race.log_().neg_()
        return (probs / race).argmax(dim=-1)

    # ---- logprobs ------------------------------------------------------------------------------

    @staticmethod
    def _gather_logprobs(
        raw: torch.Tensor | None, token_ids: list[int], requests: list[SampleRequest]
    ) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * len(requests)
        if raw is None:
            return result
        rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        chosen = torch.tensor([token_ids[i] for i in rows], device=raw.device).unsqueeze(1)
        chosen_lp = raw.gather(1, chosen)
        ranks = ((raw > chosen_lp).sum(dim=-1) + 1).tolist()
        n_top = max(requests[i].params.logprobs or 0 for i in rows)
        top_lp, top_ids = raw.topk(min(n_top, raw.shape[1]), dim=-1)
        top_lp_l, top_ids_l, chosen_l = top_lp.tolist(), top_ids.tolist(), chosen_lp.squeeze(1).tolist()
        for j, i in enumerate(rows):
            n = requests[i].params.logprobs or 0
            top = list(zip(top_ids_l[j][:n], top_lp_l[j][:n], strict=True))
            result[i] = TokenLogprobs(token_ids[i], chosen_l[j], ranks[j], top)
        return result


def apply_penalties(logits: torch.Tensor, requests: list[SampleRequest]) -> None:
    """Repetition (prompt + output) and presence/frequency (output only) penalties, in place."""
    rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[1]
    reqs = [requests[i] for i in rows]
    row_idx = torch.tensor(rows, device=dev)
    sub = logits[row_idx]

    # Out-of-vocabulary ids go to an extra column that is dropped, so they change nothing.
    def padded(seqs: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(s) for s in seqs))
        out = torch.full((len(seqs), width), vocab, dtype=torch.long)
        for j, s in enumerate(seqs):
            if s:
                out[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        out = out.to(dev)
        return torch.where((out >= 0) & (out < vocab), out, vocab)

    rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=dev).unsqueeze(1)
    if bool((rep != 1.0).any()):
        # HF/vLLM: over prompt + output; shrink positive logits and push negative ones further down.
        seen = torch.zeros(len(reqs), vocab + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, padded([r.token_ids for r in reqs]), True)
        seen = seen[:, :vocab]
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)

    presence = torch.tensor([r.params.presence_penalty for r in reqs], device=dev).unsqueeze(1)
    frequency = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev).unsqueeze(1)
    if bool((presence != 0).any() | (frequency != 0).any()):
        # OpenAI/vLLM: over generated tokens only.
        out_ids = padded([r.token_ids[r.num_prompt_tokens :] for r in reqs])
        counts = torch.zeros(len(reqs), vocab + 1, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        sub = sub - frequency * counts - presence * (counts > 0).to(logits.dtype)
    logits[row_idx] = sub


def apply_token_mask(logits: torch.Tensor, rows: torch.Tensor, disallowed: torch.Tensor) -> None:
    """Set the disallowed tokens of the given rows to -inf, in place. A mask narrower than the logits (a
    tokenizer smaller than the embedding) disallows the extra columns too."""
    vocab = logits.shape[1]
    if disallowed.shape[1] < vocab:
        pad = disallowed.new_ones((disallowed.shape[0], vocab - disallowed.shape[1]))
        disallowed = torch.cat([disallowed, pad], dim=1)
    elif disallowed.shape[1] > vocab:
        disallowed = disallowed[:, :vocab]
    if rows.numel() == logits.shape[0] and bool(
        (rows == torch.arange(rows.numel(), device=rows.device)).all()
    ):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    sub = logits.index_select(0, rows)
    sub.masked_fill_(disallowed, float("-inf"))
    logits.index_copy_(0, rows, sub)


def apply_suppression(logits: torch.Tensor, requests: list[SampleRequest]) -> None:
    """Set each row's ``suppress_token_ids`` to -inf, in place."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        # Ids outside the vocabulary can never be sampled, so dropping them is exact.
        ids = [t for t in r.suppress_token_ids if 0 <= t < vocab]
        rows.extend([i] * len(ids))
        cols.extend(ids)
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")


def apply_top_k_top_p(logits: torch.Tensor, ks: torch.Tensor | None, ps: torch.Tensor | None) -> None:
    """Mask (to -inf, in place) what falls outside each row's top-k, then outside its top-p nucleus.

    ``ks``: [S] long, V for rows without top-k; ``ps``: [S] float, inf for rows without top-p.
    """
    if ps is None:
        if ks is None:
            return
        # Without top-p a partial selection suffices: keep logits >= the row's k-th largest
        # (ties with it included, as in vLLM). Rows without top-k must not widen the selection.
        vocab = logits.shape[1]
        enabled = ks < vocab
        k_max = int(torch.where(enabled, ks, 0).max())
        if k_max == 0:
            return
        top = logits.topk(k_max, dim=-1).values
        kth = top.gather(1, (ks.clamp(max=k_max) - 1).unsqueeze(1))
        kth.masked_fill_(~enabled.unsqueeze(1), float("-inf"))
        logits.masked_fill_(logits < kth, float("-inf"))
        return
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if ks is not None:
        positions = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        sorted_logits.masked_fill_(positions >= ks.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass strictly before it is below p: the best token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits.masked_fill_(mass_before >= ps.unsqueeze(1), float("-inf"))
    logits.scatter_(1, order, sorted_logits)

"""Engine logprobs in OpenAI's two shapes: the legacy completions one and the chat one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..engine.sampler import TokenLogprobs
from .protocol import ChatLogprobEntry, CompletionLogprobs, TopLogprob

# JSON has no -inf; vLLM reports impossible tokens as -9999.0 too.
_FLOOR = -9999.0

Decode = Callable[[int], str]


def _lp(value: float) -> float:
    return _FLOOR if math.isnan(value) or value < _FLOOR else float(value)


def completion_logprobs(
    tls: Sequence[TokenLogprobs], decode: Decode, num_top: int, text_offset: int
) -> CompletionLogprobs:
    """`text_offset` is where the first token's text starts in the choice's text (after an echoed prompt)."""
    out = CompletionLogprobs()
    offset = text_offset
    for tl in tls:
        token = decode(tl.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(_lp(tl.logprob))
        out.text_offset.append(offset)
        offset += len(token)
        if num_top > 0:
            # As vLLM does, the chosen token is always among the alternatives.
            top = {decode(tid): _lp(lp) for tid, lp in tl.top[:num_top]}
            top.setdefault(token, _lp(tl.logprob))
            out.top_logprobs.append(top)
        else:
            out.top_logprobs.append(None)
    return out


def chat_logprobs(tls: Sequence[TokenLogprobs], decode: Decode, num_top: int) -> list[ChatLogprobEntry]:
    entries: list[ChatLogprobEntry] = []
    for tl in tls:
        token = decode(tl.token_id)
        top = [
            TopLogprob(token=(t := decode(tid)), logprob=_lp(lp), bytes=list(t.encode("utf-8")))
            for tid, lp in tl.top[:num_top]
        ]
        entries.append(
            ChatLogprobEntry(
                token=token, logprob=_lp(tl.logprob), bytes=list(token.encode("utf-8")), top_logprobs=top
            )
        )
    return entries

"""Sequential scheduling policies: `prefill-first` (vLLM V0) and `chunked` (vLLM V1 / SGLang chunked prefill).

Both produce one batch per step. The multiplexing policies (`static-split`, `drift`) live in
`drift_agent.multiplex.policies` and return concurrent prefill and decode batches instead.
"""

from __future__ import annotations

from .scheduler import Batch, ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import SequenceStatus


def _continue_prefills(sched: Scheduler, budget: int, preempted: list) -> tuple[list[ScheduledSeq], int]:
    """Next chunks of running sequences whose prompt is only partly computed."""
    items: list[ScheduledSeq] = []
    for seq in list(sched.running):
        if budget <= 0:
            break
        if seq.in_flight or not seq.is_prefilling or seq.status is not SequenceStatus.RUNNING:
            continue
        n = min(seq.num_uncomputed_tokens, budget)
        item = sched.grow_or_preempt(seq, n, preempted)
        if item is not None:
            items.append(item)
            budget -= n
    return items, budget


def _admit_waiting(
    sched: Scheduler, budget: int, *, chunk_any: bool, allow_first_chunk: bool
) -> tuple[list[ScheduledSeq], int]:
    """Admit waiting sequences in FCFS order while budget, sequence slots and KV last.

    chunk_any: any admitted prompt may be cut to the remaining budget (V1). Otherwise only a first prompt
    that alone exceeds the budget is cut (so a long prompt still makes progress)."""
    items: list[ScheduledSeq] = []
    while sched.waiting and budget > 0:
        seq = sched.waiting[0]
        whole_only = not chunk_any and not (allow_first_chunk and not items)
        item = sched.try_admit(seq, budget, whole_only=whole_only)
        if item is None:
            break
        items.append(item)
        budget -= item.num_new_tokens
    return items, budget


def decode_all(sched: Scheduler, budget: int, preempted: list) -> tuple[list[ScheduledSeq], int]:
    """One token for every running, decoding sequence, oldest first; the newest are preempted for room.

    This runs once per step over the whole running batch (and once per simulated step), so the common case
    is inlined: a decoding sequence whose last block still has a free slot is scheduled without calls."""
    items: list[ScheduledSeq] = []
    append = items.append
    block_size = sched.bm.block_size
    running = SequenceStatus.RUNNING
    for seq in list(sched.running):
        if budget <= 0:
            break
        if seq.in_flight or seq.status is not running:
            continue
        n, computed = len(seq.token_ids), seq.num_computed_tokens
        if n - computed > 1 or n == seq.num_prompt_tokens:  # still prefilling (`seq.is_prefilling`)
            continue
        if len(seq.block_table) * block_size > computed:
            seq.in_flight = True  # as `Scheduler.try_grow` with room in the last block
            append(ScheduledSeq(seq, computed, 1))
        else:
            item = sched.grow_or_preempt(seq, 1, preempted)
            if item is None:
                continue
            append(item)
        budget -= 1
    return items, budget


class PrefillFirstPolicy:
    """Prefill whenever a prompt is waiting; decode only when none is (vLLM V0). Prefill and decode never
    share a step, so long prompts stall every running decode: the TPOT interference Drift removes."""

    name = "prefill-first"

    def schedule(self, sched: Scheduler, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = sched.config.max_num_batched_tokens
        items, budget = _continue_prefills(sched, budget, out.preempted)
        more, budget = _admit_waiting(sched, budget, chunk_any=False, allow_first_chunk=not items)
        items += more
        if items:
            out.batches.append(Batch(items, "prefill"))
            return out
        items, _ = decode_all(sched, budget, out.preempted)
        if items:
            out.batches.append(Batch(items, "decode"))
        return out


class ChunkedPolicy:
    """Decode-first with a token budget, filled with prefill chunks (vLLM V1 / SGLang chunked prefill):
    each step mixes every running decode with as much prefill as the budget allows."""

    name = "chunked"

    def schedule(self, sched: Scheduler, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = sched.config.max_num_batched_tokens
        decodes, budget = decode_all(sched, budget, out.preempted)
        prefills, budget = _continue_prefills(sched, budget, out.preempted)
        more, budget = _admit_waiting(sched, budget, chunk_any=True, allow_first_chunk=True)
        prefills += more
        items = decodes + prefills
        if items:
            phase = "mixed" if decodes and prefills else ("decode" if decodes else "prefill")
            out.batches.append(Batch(items, phase))
        return out


SEQUENTIAL_POLICIES = {p.name: p for p in (PrefillFirstPolicy, ChunkedPolicy)}

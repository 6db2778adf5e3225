"""Failure isolation in the engine loop: a request whose own work fails (seeding, detokenizing) ends alone with
an error; a step that raises fails only the requests of its batch, frees their KV blocks and leaves the engine
serving; an error that leaves the engine unusable (a CUDA error, an inconsistent state, every step failing)
marks it dead. Concurrent requests must come out token for token as in a run without the fault (greedy)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from drift_agent.core.config import EngineConfig
from drift_agent.core.errors import (
    EngineDeadError,
    InvalidRequestError,
    RequestFailedError,
    is_fatal_error,
)
from drift_agent.core.sampling_params import MAX_SEED, SamplingParams
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.detokenizer import IncrementalDetokenizer
from drift_agent.engine.llm_engine import MAX_CONSECUTIVE_FAILED_STEPS, LLMEngine
from drift_agent.engine.outputs import RequestOutput
from tests.tiny_models import tiny_model_dir

PROMPTS = {
    "a": [11, 12, 13, 14, 15, 16, 17],
    "b": [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
    "c": [41, 42, 43],
    "d": [51, 52, 53, 54, 55, 56, 57, 58, 59],
}
MAX_TOKENS = 8


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)


def make_engine(**kw: Any) -> LLMEngine:
    base = dict(model=str(tiny_model_dir("llama")), block_size=4, num_kv_blocks=128)
    return LLMEngine(EngineConfig(**(base | kw)))


def assert_clean(eng: LLMEngine) -> None:
    """Nothing left open, every block back in the pool, and the pool's and queues' invariants hold."""
    eng.check_invariants()
    eng.block_manager.check_invariants()
    assert not eng.requests and not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.runner.generators
    assert eng.dead is None


def drive(
    eng: LLMEngine, before_step: Callable[[int], None] | None = None, max_steps: int = 500
) -> dict[str, RequestOutput]:
    """Step until nothing is left; every request's final output."""
    final: dict[str, RequestOutput] = {}
    for step in range(max_steps):
        if before_step is not None:
            before_step(step)
        if not eng.has_unfinished_requests():
            return final
        for out in eng.step():
            if out.finished:
                assert out.request_id not in final, "two final outputs"
                final[out.request_id] = out
    raise AssertionError("requests did not finish")


def reference(eng: LLMEngine, ids: str = "abcd") -> dict[str, list[int]]:
    """Greedy tokens of each prompt run without faults (on the engine under test)."""
    for rid in ids:
        eng.add_request(rid, PROMPTS[rid], greedy())
    outs = drive(eng)
    assert_clean(eng)
    return {rid: outs[rid].token_ids for rid in ids}


def assert_failed(out: RequestOutput, cause: type[BaseException] | None = None) -> None:
    assert out.finished and out.finish_reason == "error"
    assert isinstance(out.error, RequestFailedError)
    if cause is not None:
        assert isinstance(out.error.__cause__, cause)


def assert_serves(eng: LLMEngine, ref: dict[str, list[int]]) -> None:
    """A new request after the fault comes out exactly as without it."""
    eng.add_request("after", PROMPTS["a"], greedy())
    assert drive(eng)["after"].token_ids == ref["a"]
    assert_clean(eng)


@pytest.fixture(scope="module")
def eng() -> LLMEngine:
    return make_engine()


@pytest.fixture(scope="module")
def ref(eng: LLMEngine) -> dict[str, list[int]]:
    return reference(eng)


# ---- per-request failures ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed, n, ok",
    [
        (2**64, 1, False),
        (-(2**63) - 1, 1, False),
        (2**64 - 1, 2, False),
        (MAX_SEED, 1, True),
        (-(2**63), 1, True),
    ],
)
def test_seeds_torch_cannot_take_are_rejected_by_sampling_params(seed, n, ok):
    if ok:
        SamplingParams(seed=seed, n=n)
        return
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=seed, n=n)


def test_out_of_range_seeds_through_the_engine_api_fail_only_their_request(eng, ref):
    """{"seed": 2**64} and n=2 with seed 2**64-1 (choice 1 gets seed + 1), whichever way they reach it."""
    sampled = dict(temperature=1.0, max_tokens=3, ignore_eos=True)
    # n > 1 fans out as n requests seeded seed + i: choice 0 is valid, choice 1 is refused when built.
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=MAX_SEED + 1, **sampled)
    # Validation bypassed by changing the field afterwards: add_request checks again and adds nothing.
    bypassed = SamplingParams(**sampled)
    bypassed.seed = MAX_SEED + 1
    with pytest.raises(InvalidRequestError, match="seed"):
        eng.add_request("bad", "hi", bypassed)
    with pytest.raises(InvalidRequestError, match="seed"):
        eng.generate([PROMPTS["a"], "hi"], [greedy(), bypassed])
    assert_clean(eng)

    # Changed after it was accepted: the seed reaches the sampler's RNG, which refuses it mid-step.
    late = SamplingParams(seed=MAX_SEED, **sampled)
    eng.add_request("a", PROMPTS["a"], greedy())
    eng.add_request("choice0", "hi", SamplingParams(seed=MAX_SEED, **sampled))
    eng.add_request("choice1", "hi", late)
    eng.add_request("b", PROMPTS["b"], greedy())
    late.seed = MAX_SEED + 1
    outs = drive(eng)
    assert_failed(outs["choice1"], ValueError)
    assert outs["choice0"].finish_reason == "length" and outs["choice0"].num_output_tokens == 3
    assert outs["a"].token_ids == ref["a"] and outs["b"].token_ids == ref["b"]
    assert_clean(eng)
    assert_serves(eng, ref)


def test_detokenizer_fault_fails_only_its_request(eng, ref):
    for rid in "abc":
        eng.add_request(rid, PROMPTS[rid], greedy())
    real = eng.requests["c"].detok.update
    calls = 0

    def failing_update(new_ids: list[int], **kw: Any) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("broken tokenizer table")
        return real(new_ids, **kw)

    eng.requests["c"].detok.update = failing_update  # type: ignore[method-assign]
    streamed: dict[str, list[RequestOutput]] = {}

    def step_and_keep() -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                streamed.setdefault(out.request_id, []).append(out)
                if out.finished:
                    final[out.request_id] = out
        return final

    outs = step_and_keep()
    assert_failed(outs["c"], KeyError)
    assert [o.finished for o in streamed["c"]] == [False, False, True]  # two tokens, then the error
    assert outs["a"].token_ids == ref["a"] and outs["b"].token_ids == ref["b"]
    assert_clean(eng)
    assert_serves(eng, ref)


# ---- step failures ---------------------------------------------------------------------------------------
def inject_step_fault(eng: LLMEngine, site: str, exc: Exception, times: int = 1) -> list[list[str]]:
    """Make the next `times` steps raise `exc` at `site`; returns the request ids of each faulted batch."""
    hit: list[list[str]] = []

    def fault(batch_ids: list[str]) -> None:
        hit.append(batch_ids)
        if len(hit) >= times:
            restore()
        raise exc

    if site == "forward":
        real = eng.runner.forward_logits

        def forward(batch):
            fault([i.seq.request_id for i in batch.items])

        eng.runner.forward_logits = forward  # type: ignore[method-assign]

        def restore() -> None:
            eng.runner.forward_logits = real  # type: ignore[method-assign]

    elif site == "sampler":  # the batched sampling (a logits processor would run here)
        real = eng.runner.sampler

        def sampler(logits, requests):
            fault([str(len(requests))])

        eng.runner.sampler = sampler  # type: ignore[assignment]

        def restore() -> None:
            eng.runner.sampler = real

    elif site == "schedule":  # the policy raises after it admitted and scheduled sequences
        real = eng.scheduler.policy.schedule

        def schedule(sched, now):
            out = real(sched, now)
            fault([i.seq.request_id for b in out.batches for i in b.items])

        eng.scheduler.policy.schedule = schedule  # type: ignore[method-assign]

        def restore() -> None:
            eng.scheduler.policy.schedule = real  # type: ignore[method-assign]

    elif site == "post":  # tokens appended, sequences retired, then posting the batch raises
        real = eng.scheduler.on_batch_done

        def on_batch_done(batch, sampled):
            real(batch, sampled)
            fault([i.seq.request_id for i in batch.items])

        eng.scheduler.on_batch_done = on_batch_done  # type: ignore[method-assign]

        def restore() -> None:
            eng.scheduler.on_batch_done = real  # type: ignore[method-assign]

    else:
        raise ValueError(site)
    return hit


@pytest.mark.parametrize("site", ["forward", "sampler", "schedule", "post"])
def test_step_fault_fails_its_batch_and_waiting_requests_go_on(site):
    """Two sequence slots: the faulted step holds a and b; c and d wait, then run as if nothing happened."""
    eng = make_engine(max_num_seqs=2)
    ref = reference(eng)
    for rid in "abcd":
        eng.add_request(rid, PROMPTS[rid], greedy())
    hit = inject_step_fault(eng, site, RuntimeError("injected step fault"))
    outs = drive(eng)
    assert len(hit) == 1
    assert_failed(outs["a"], RuntimeError)
    assert_failed(outs["b"], RuntimeError)
    assert outs["c"].token_ids == ref["c"] and outs["d"].token_ids == ref["d"]
    assert_clean(eng)
    assert_serves(eng, ref)


def test_forward_fault_in_a_prefill_step_spares_the_running_decodes():
    """prefill-first runs a newcomer's prefill as a step of its own: only the newcomer fails, while a and b,
    mid-decode, finish exactly as without the fault."""
    eng = make_engine(policy="prefill-first")
    ref = reference(eng)
    for rid in "ab":
        eng.add_request(rid, PROMPTS[rid], greedy())
    hit: list[list[list[str]]] = []

    def arrive(step: int) -> None:
        if step == 3:
            eng.add_request("c", PROMPTS["c"], greedy())
            hit.append(inject_step_fault(eng, "forward", torch.OutOfMemoryError("CUDA out of memory.")))

    outs = drive(eng, arrive)
    assert hit == [[["c"]]]
    assert_failed(outs["c"], torch.OutOfMemoryError)  # out of memory fails one batch, not the engine
    assert outs["a"].token_ids == ref["a"] and outs["b"].token_ids == ref["b"]
    assert_clean(eng)
    assert_serves(eng, ref)


def test_step_fault_in_a_multiplexed_engine_keeps_the_lanes_serving():
    eng = make_engine(policy="drift", num_kv_blocks=256, partition={"fold_max_tokens": 0})
    assert eng.is_multiplexing
    ref = reference(eng)
    for rid in "ab":
        eng.add_request(rid, PROMPTS[rid], greedy())
    hit: list[list[list[str]]] = []

    def arrive(step: int) -> None:
        if step == 3:  # c's prefill job starts on the prefill lane as the decode lane fails
            eng.add_request("c", PROMPTS["c"], greedy())
            hit.append(inject_step_fault(eng, "forward", RuntimeError("injected decode lane fault")))
        if step == 6:
            eng.add_request("d", PROMPTS["d"], greedy())

    outs = drive(eng, arrive)
    (batches,) = hit
    assert len(batches) == 1
    failed = {rid for rid, out in outs.items() if out.finish_reason == "error"}
    assert set(batches[0]) <= failed and "d" not in failed
    for rid, out in outs.items():
        if rid in failed:
            assert_failed(out, RuntimeError)
        else:
            assert out.token_ids == ref[rid]
    assert_clean(eng)
    assert not eng._mux[1].lanes and not eng._mux[1].jobs
    assert_serves(eng, ref)


# ---- fatal failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, fatal",
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (torch.AcceleratorError("CUDA error: device-side assert triggered"), True),
        (EngineDeadError("gone"), True),
        (RequestFailedError("wrapped"), False),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("shape mismatch"), False),
        (ValueError("Overflow when unpacking long long"), False),
    ],
)
def test_fatal_errors_are_device_errors_and_dead_engines(exc, fatal):
    assert is_fatal_error(exc) is fatal
    wrapper = RequestFailedError("lane failed")
    wrapper.__cause__ = exc
    assert is_fatal_error(wrapper) is fatal


def test_cuda_error_marks_the_engine_dead():
    eng = make_engine()
    for rid in "ab":
        eng.add_request(rid, PROMPTS[rid], greedy())
    inject_step_fault(eng, "forward", RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        eng.step()
    assert eng.dead is not None
    with pytest.raises(EngineDeadError):
        eng.step()
    with pytest.raises(EngineDeadError):
        eng.add_request("c", PROMPTS["c"], greedy())


def test_failure_that_leaves_the_pool_inconsistent_is_fatal():
    eng = make_engine()
    eng.add_request("a", PROMPTS["a"], greedy())
    real = eng.runner.forward_logits

    def corrupting_forward(batch):
        eng.block_manager.blocks[batch.items[0].seq.block_table[0]].ref_count += 1  # a half-done accounting
        raise RuntimeError("injected fault after corrupting the pool")

    eng.runner.forward_logits = corrupting_forward  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError, match="refcount"):
        eng.step()
    eng.runner.forward_logits = real  # type: ignore[method-assign]
    assert eng.dead is not None
    with pytest.raises(EngineDeadError):
        eng.step()


def test_every_step_failing_marks_the_engine_dead():
    eng = make_engine(max_num_seqs=1)
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS + 1):
        eng.add_request(f"r{i}", PROMPTS["a"], greedy())
    hit = inject_step_fault(eng, "forward", RuntimeError("persistent fault"), times=10**6)
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS - 1):
        (out,) = eng.step()
        assert out.request_id == f"r{i}"
        assert_failed(out, RuntimeError)
    with pytest.raises(EngineDeadError, match="in a row"):
        eng.step()
    assert len(hit) == MAX_CONSECUTIVE_FAILED_STEPS


# ---- the async front -------------------------------------------------------------------------------------
async def test_async_engine_raises_a_request_failure_to_its_consumer_only(monkeypatch):
    """A failed request's stream raises its error; the others stream to the end and the loop keeps running.
    A fatal fault then fails open streams with EngineDeadError and the loop reports itself dead."""
    real = IncrementalDetokenizer.update

    def update(self: IncrementalDetokenizer, new_ids: list[int], **kw: Any) -> str | None:
        if "<fault>" in self._stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self, new_ids, **kw)

    monkeypatch.setattr(IncrementalDetokenizer, "update", update)
    eng = make_engine()
    aeng = AsyncLLMEngine(eng)
    aeng.start()
    try:
        good = await aeng.generate(PROMPTS["a"], greedy(), "good")
        bad = await aeng.generate(PROMPTS["b"], SamplingParams(max_tokens=4, stop=["<fault>"]), "bad")

        async def consume(stream) -> list[RequestOutput]:
            return [out async for out in stream]

        results = await asyncio.gather(consume(good), consume(bad), return_exceptions=True)
        assert results[0][-1].finish_reason == "length" and results[0][-1].num_output_tokens == MAX_TOKENS
        assert isinstance(results[1], RequestFailedError)
        assert isinstance(results[1].__cause__, UnicodeDecodeError)
        assert aeng.is_running and not aeng.is_dead

        stream = await aeng.generate(PROMPTS["c"], SamplingParams(max_tokens=400, ignore_eos=True), "doomed")
        inject_step_fault(eng, "forward", RuntimeError("CUDA error: unspecified launch failure"))
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(consume(stream), 10)
        assert aeng.is_dead and not aeng.is_running
        with pytest.raises(EngineDeadError):
            await aeng.generate(PROMPTS["a"], greedy())
    finally:
        aeng.shutdown()

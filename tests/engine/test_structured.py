"""Structured outputs in the engine: masks only on the rows that need them, greedy equality for free text,
every scheduling policy, preemption, n > 1 seeds, and compile errors before anything runs."""

from __future__ import annotations

import gc
import json
import re

import jsonschema
import pytest
import torch

from drift_agent.core.errors import InvalidRequestError
from drift_agent.core.sampling_params import SamplingParams, StructuredOutput
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.engine.sampler import Sampler, SampleRequest, apply_token_mask
from tests.server.conftest import tiny_engine_config

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "w": {"enum": ["x", "y"]},
    },
    "required": ["id", "ok", "w"],
    "additionalProperties": False,
}


def js(seed: int | None = None, temperature: float = 1.0, **kw: object) -> SamplingParams:
    so = StructuredOutput("json_schema", SCHEMA, "response_format")
    return SamplingParams(**({"max_tokens": 80} | kw), temperature=temperature, seed=seed, structured=so)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(tiny_engine_config())


def test_mask_touches_only_its_rows() -> None:
    logits = torch.randn(3, 10)
    before = logits.clone()
    disallowed = torch.ones(1, 10, dtype=torch.bool)
    disallowed[0, 4] = False
    apply_token_mask(logits, torch.tensor([1]), disallowed)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert int(logits[1].argmax()) == 4 and torch.isinf(logits[1]).sum() == 9
    reqs = [SampleRequest(SamplingParams(temperature=0), [1], 1) for _ in range(3)]
    out = Sampler()(before.clone(), reqs, (torch.tensor([2]), disallowed))
    assert out.token_ids[2] == 4 and out.token_ids[:2] == before[:2].argmax(-1).tolist()


def test_free_text_greedy_unchanged(engine: LLMEngine) -> None:
    free = SamplingParams(max_tokens=16, temperature=0)
    alone = engine.generate(["The quick brown"], free)[0].token_ids
    mixed = engine.generate(["The quick brown", "hi", "yo"], [free, js(1), js(2, temperature=0)])
    assert mixed[0].token_ids == alone
    for out in mixed[1:]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("policy", ["prefill-first", "chunked", "static-split", "drift"])
def test_every_policy(policy: str) -> None:
    eng = LLMEngine(tiny_engine_config(policy=policy))
    prompts = ["a b c " * (i + 1) for i in range(6)]
    params = [js(i) if i % 2 == 0 else SamplingParams(max_tokens=12, temperature=0) for i in range(6)]
    params[1] = SamplingParams(max_tokens=20, structured=StructuredOutput("regex", r"[a-z]{2}-[0-9]{2}"))
    outs = eng.generate(prompts, params)
    for i, out in enumerate(outs):
        if i % 2 == 0:
            jsonschema.validate(json.loads(out.text), SCHEMA)
            assert out.finish_reason == "stop"
    assert re.fullmatch(r"[a-z]{2}-[0-9]{2}", outs[1].text)
    eng.check_invariants()


def test_seeded_reproducible_and_preemption() -> None:
    """Seeded requests give the same valid outputs in a roomy pool and one so small it preempts."""
    roomy = LLMEngine(tiny_engine_config())
    tight = LLMEngine(tiny_engine_config(num_kv_blocks=14, max_num_seqs=8))
    prompts = ["x " * 40 for _ in range(6)]
    params = [js(seed=100 + i, max_tokens=60) for i in range(6)]
    a = roomy.generate(prompts, params)
    b = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.text for o in a] == [o.text for o in b]
    for o in a:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_choice_and_grammar_end_without_eos(engine: LLMEngine) -> None:
    outs = engine.generate(
        ["q"] * 2,
        [
            SamplingParams(max_tokens=10, structured=StructuredOutput("choice", ["alpha", "beta"])),
            SamplingParams(max_tokens=10, structured=StructuredOutput("grammar", 'start: "ab" "c"')),
        ],
    )
    assert outs[0].text in ("alpha", "beta") and outs[0].finish_reason == "stop"
    assert outs[1].text == "abc" and outs[1].finish_reason == "stop"


def test_min_tokens_does_not_fight_the_grammar(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=10, min_tokens=5, structured=StructuredOutput("choice", ["ok"]))
    assert engine.generate(["q"], p)[0].text == "ok"


@pytest.mark.parametrize(
    "so",
    [
        StructuredOutput("regex", "(?=a)b", "guided_regex"),
        StructuredOutput("json_schema", {"type": "bogus"}, "guided_json"),
        StructuredOutput("grammar", "start: nothere", "guided_grammar"),
        StructuredOutput("choice", [], "guided_choice"),
    ],
)
def test_compile_errors_name_the_field(engine: LLMEngine, so: StructuredOutput) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.make_sequence("bad", "hello", SamplingParams(structured=so))
    assert getattr(info.value, "param", None) == so.param
    assert not engine.has_unfinished_requests()


def test_compiled_grammars_are_cached(engine: LLMEngine) -> None:
    so = StructuredOutput("json_schema", SCHEMA)
    cache = engine.runner.structured
    assert cache.compile(so) is cache.compile(StructuredOutput("json_schema", dict(SCHEMA)))


def test_matchers_released(engine: LLMEngine) -> None:
    engine.generate(["a", "b"], [js(1), js(2)])
    assert engine.runner.structured.matchers == {}


@pytest.mark.parametrize("site", ["compute_logits", "sample"])
def test_masks_never_outlive_a_failed_step(site: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises after its masks were started (the logits head, or before sampling as when a
    multiplexed lane fails between its forward pass and its sampling) leaves no pending mask behind, so the
    next batch samples with its own masks: greedy grammar outputs come out as without the fault."""
    from tests.engine.test_failure_isolation import drive

    eng = LLMEngine(tiny_engine_config())
    prompts = ["a b", "c d e", "f"]
    params = [js(temperature=0), js(temperature=0, max_tokens=60), js(temperature=0, max_tokens=70)]
    ref = [o.text for o in eng.generate(prompts, params)]
    runner = eng.runner
    target = runner.model if site == "compute_logits" else runner
    real = getattr(target, site)
    calls = {"n": 0}

    def failing(*args: object, **kw: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # a decode step, masks in flight
            raise RuntimeError("injected")
        return real(*args, **kw)

    monkeypatch.setattr(target, site, failing)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", p, sp)
    outs = drive(eng)
    assert calls["n"] >= 2 and all(o.finish_reason == "error" for o in outs.values())
    gc.collect()  # a batch that never sampled is freed with the failed step's state
    assert runner._mask_jobs == {}
    monkeypatch.setattr(target, site, real)
    again = eng.generate(prompts, params)
    assert [o.text for o in again] == ref
    for o in again:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert runner._mask_jobs == {}


def test_stale_masks_are_dropped_with_their_batch(engine: LLMEngine) -> None:
    """Masks started for a batch that is never sampled go away with the batch (their key, its id, may be
    reused by a later batch only then), and clear_masks() forgets every pending one."""
    from drift_agent.core.scheduler import Batch, ScheduledSeq

    runner = engine.runner
    seq = engine.make_sequence("m", "hello", js(1))
    batch = Batch([ScheduledSeq(seq, 0, seq.num_prompt_tokens)], "prefill")
    runner.start_masks(batch)
    assert list(runner._mask_jobs) == [id(batch)]
    del batch
    gc.collect()
    assert runner._mask_jobs == {}
    again = Batch([ScheduledSeq(seq, 0, seq.num_prompt_tokens)], "prefill")
    runner.start_masks(again)
    runner.clear_masks()
    assert runner._mask_jobs == {}
    runner.release(seq.seq_id)


def test_packed_masks_unpack_like_numpy() -> None:
    """The packed bitmask unpacked on the device matches numpy's little-endian unpacking, bit 31 included."""
    import numpy as np

    from drift_agent.engine.structured import unpack_disallowed

    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(-(2**31), 2**31 - 1, (5, 4), dtype=torch.int32, generator=gen)
    packed[0] = -1
    packed[1] = 0
    packed[2, 0] = -(2**31)  # only bit 31
    for vocab in (128, 100, 97):
        want = np.unpackbits(packed.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
        assert torch.equal(unpack_disallowed(packed, vocab), torch.from_numpy(want))

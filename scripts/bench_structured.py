"""Structured-output overhead: output tokens/s with a JSON schema against free text, at batch 1 and 16.

    python scripts/bench_structured.py [--batches 1 16] [--repeats 3]

The engine alone (`LLMEngine.generate`, no HTTP), the embedded model. Free text runs with the per-request
output lengths the JSON run produced (`ignore_eos`), so both runs have the same batch shape at every step;
best of `--repeats` runs each. Prints one line per batch size (the figures of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from drift_agent.core.sampling_params import SamplingParams, StructuredOutput
from drift_agent.engine.llm_engine import LLMEngine

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 40, "maxLength": 200},
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 4,
            "maxItems": 8,
        },
        "score": {"type": "integer"},
    },
    "required": ["title", "items", "score"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Write a short product review as JSON with a title, items and score."}]
MAX_TOKENS = 128


def run(
    engine: LLMEngine, text: str, batch: int, structured: bool, seed: int, lengths: list[int] | None = None
) -> tuple[float, int, int, list[int]]:
    """(output tok/s, output tokens, outputs that parse, per-request output lengths)."""
    lengths = lengths or [MAX_TOKENS] * batch
    params = [
        SamplingParams(
            max_tokens=lengths[i],
            temperature=0.8,
            seed=seed + i,
            ignore_eos=not structured,
            structured=StructuredOutput("json_schema", SCHEMA) if structured else None,
        )
        for i in range(batch)
    ]
    t0 = time.perf_counter()
    outs = engine.generate([text] * batch, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    valid = batch
    if structured:
        valid = 0
        for o in outs:
            with contextlib.suppress(ValueError):  # cut off at max_tokens: not JSON
                valid += o.finish_reason == "stop" and json.loads(o.text) is not None
    return tokens / seconds, tokens, valid, [len(o.token_ids) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    engine = LLMEngine(max_num_seqs=max(32, *args.batches))
    text = engine.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    run(engine, text, 2, False, 0)  # warm up: oneDNN weights, the grammar's compile
    run(engine, text, 2, True, 0)
    for batch in args.batches:
        free, constrained = [], []
        for rep in range(args.repeats):
            js = run(engine, text, batch, True, 1000 * rep)
            constrained.append(js)
            free.append(run(engine, text, batch, False, 1000 * rep, js[3]))
        best_free = max(r[0] for r in free)
        best_json = max(r[0] for r in constrained)
        print(
            f"batch {batch}: free text {best_free:.1f} tok/s, json_schema {best_json:.1f} tok/s, "
            f"overhead {100 * (1 - best_json / best_free):.1f}% "
            f"(valid JSON per run: {[r[2] for r in constrained]} of {batch})",
            flush=True,
        )


if __name__ == "__main__":
    main()

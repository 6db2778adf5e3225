"""Offline throughput: the same prompts and output lengths through Drift's engine and through transformers'
batched `generate`, in one run, so the ratio is measured on the same machine at the same moment.

Both sides generate exactly each request's target output length (Drift with ignore_eos + max_tokens;
transformers with `min_new_tokens == max_new_tokens` per batch, its longest target), and both are credited only
with the target lengths: the tokens transformers computes past a shorter request's target in a padded static
batch are the cost of static batching that continuous batching removes.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass


@dataclass
class OfflineWorkload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    vocab_ids: list[int], num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> OfflineWorkload:
    """Random token prompts (vLLM's `random` dataset), lengths uniform in the given inclusive ranges."""
    rng = random.Random(seed)
    prompts = [[rng.choice(vocab_ids) for _ in range(rng.randint(*input_len))] for _ in range(num_prompts)]
    outs = [rng.randint(*output_len) for _ in range(num_prompts)]
    return OfflineWorkload(prompts, outs)


@dataclass
class RunResult:
    name: str
    seconds: float
    output_tokens: int
    prompt_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.seconds


def run_drift(engine, wl: OfflineWorkload) -> RunResult:
    from ..engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    t0 = time.perf_counter()
    outs = engine.generate(wl.prompts, params)
    dt = time.perf_counter() - t0
    produced = sum(o.num_output_tokens for o in outs)
    if produced != wl.num_output_tokens:
        raise RuntimeError(f"drift produced {produced} tokens, expected {wl.num_output_tokens}")
    return RunResult("drift", dt, produced, wl.num_prompt_tokens)


def run_transformers(model, pad_id: int, wl: OfflineWorkload, batch_size: int) -> RunResult:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(wl.prompts), batch_size):
            prompts = wl.prompts[start : start + batch_size]
            target = max(wl.output_lens[start : start + batch_size])
            width = max(map(len, prompts))
            # Left padding, as decoder-only batched generation requires.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=target,
                min_new_tokens=target,
                do_sample=False,
                pad_token_id=pad_id,
            )
    dt = time.perf_counter() - t0
    return RunResult("transformers", dt, wl.num_output_tokens, wl.num_prompt_tokens)


def compare(drift: RunResult, hf: RunResult) -> dict:
    return {
        "drift": asdict(drift) | {"output_tokens_per_s": drift.output_tokens_per_s},
        "transformers": asdict(hf) | {"output_tokens_per_s": hf.output_tokens_per_s},
        "ratio_output_tokens_per_s": drift.output_tokens_per_s / hf.output_tokens_per_s,
    }

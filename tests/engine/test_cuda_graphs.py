"""Decode CUDA graphs: buckets, static buffers, padding and slicing, fallbacks. On CPU a stand-in "graph" reruns
the captured callable over the static buffers, so replay is checked against eager decode on tiny models; the
real capture and replay are GPU tests."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import torch

from drift_agent.engine.cuda_graphs import DecodeGraphs, capture_sizes, eager_capture, unsupported_reason
from drift_agent.models.attention import TritonBackend
from drift_agent.models.loader import load_model
from tests.models.paged import PagedDriver
from tests.tiny_models import tiny_model_dir

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def use_graph_safe_backend(model: Any, use_kernel: bool = False) -> None:
    """Swap in the triton backend (its fixed-shape torch decode on CPU): the capturable one."""
    backend = TritonBackend(
        model.num_heads,
        model.num_kv_heads,
        model.head_dim,
        model.head_dim**-0.5,
        model.lm_head.weight.dtype,
        use_kernel=use_kernel,
    )
    model.attn_backend = backend
    for layer in model.model.layers:
        layer.self_attn.backend = backend


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(4) == [1, 2, 4]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]


def test_bucket_selection() -> None:
    model, _ = load_model(tiny_model_dir("llama"), "float32", "cpu", attention_backend="sdpa")
    graphs = DecodeGraphs(model, torch.device("cpu"), 4, 20, 8, capture=eager_capture)
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 20, 21)] == [1, 2, 4, 8, 8, 16, 20, 20, None]


def test_unsupported_reasons() -> None:
    model, _ = load_model(tiny_model_dir("llama"), "float32", "cpu", attention_backend="sdpa")
    assert "not cuda" in unsupported_reason(model, torch.device("cpu"))
    assert "sdpa" in unsupported_reason(model, torch.device("cuda"))
    use_graph_safe_backend(model)
    assert unsupported_reason(model, torch.device("cuda")) is None


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3"])
def test_padded_replay_matches_eager_decode(arch: str) -> None:
    model, _ = load_model(tiny_model_dir(arch), "float32", "cpu", attention_backend="sdpa")
    use_graph_safe_backend(model)
    driver = PagedDriver(model, num_blocks=160, block_size=4, seed=1)
    graphs = DecodeGraphs(
        model, torch.device("cpu"), 4, max_num_seqs=12, max_blocks_per_seq=24, capture=eager_capture
    )
    rng = random.Random(0)
    seqs = list(range(12))
    for s in seqs:  # prompts of 1-40 tokens
        driver.step_logits([(s, [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))])])
    for size in (3, 1, 5, 12, 8, 7, 2, 4):  # buckets 4, 1, 8, 12, 8, 8, 2, 4: replays reuse captures
        batch = [(s, [rng.randrange(3, 500)]) for s in rng.sample(seqs, size)]
        ids, pos, attn = driver.metadata(batch)
        with torch.inference_mode():
            eager = model.compute_logits(model(ids, pos, attn))  # writes this step's K/V...
            hidden = graphs.run(ids, pos, attn)  # ...and so does the replay: the same bytes to the same slots
            assert hidden is not None and hidden.shape[0] == size
            torch.testing.assert_close(model.compute_logits(hidden), eager, atol=1e-5, rtol=1e-5)
    assert sorted(size for _, size in graphs.graphs) == [1, 2, 4, 8, 12]
    assert graphs.graphs[(None, 8)][0].replays == 3


def test_capture_all_leaves_the_pool_untouched_and_serves_every_size() -> None:
    model, _ = load_model(tiny_model_dir("llama3"), "float32", "cpu", attention_backend="sdpa")
    use_graph_safe_backend(model)
    driver = PagedDriver(model, num_blocks=24, block_size=4, seed=3)
    # One pool tensor, as the model runner has (capture_all saves and restores its slot 0).
    pool = torch.stack([torch.stack([k for k, _ in driver.kv]), torch.stack([v for _, v in driver.kv])])
    model.bind_kv_cache([(pool[0, i], pool[1, i]) for i in range(model.num_layers)])
    rng = random.Random(1)
    for s in range(6):  # 6 x 14 tokens fill 24 blocks: block 0 holds live K/V
        driver.step_logits([(s, [rng.randrange(3, 500) for _ in range(14)])])
    assert 0 in [b for t in driver.tables.values() for b in t] and pool[:, :, 0, 0].abs().sum() > 0
    before = pool.clone()
    graphs = DecodeGraphs(model, torch.device("cpu"), 4, 6, 8, capture=eager_capture, kv_pool=pool)
    assert graphs.capture_all() == 4 and graphs.capture_all() == 0
    assert torch.equal(pool, before) and sorted(size for _, size in graphs.graphs) == [1, 2, 4, 6]
    batch = [(s, [rng.randrange(3, 500)]) for s in (4, 0, 2)]
    ids, pos, attn = driver.metadata(batch)
    with torch.inference_mode():
        eager = model.compute_logits(model(ids, pos, attn))
        torch.testing.assert_close(
            model.compute_logits(graphs.run(ids, pos, attn)), eager, atol=1e-5, rtol=1e-5
        )
    assert graphs.graphs[(None, 4)][0].replays == 1


def test_steps_it_does_not_cover_run_eagerly() -> None:
    model, _ = load_model(tiny_model_dir("llama"), "float32", "cpu", attention_backend="sdpa")
    use_graph_safe_backend(model)
    driver = PagedDriver(model, num_blocks=64, block_size=4)
    graphs = DecodeGraphs(
        model, torch.device("cpu"), 4, max_num_seqs=2, max_blocks_per_seq=3, capture=eager_capture
    )
    with torch.inference_mode():
        assert graphs.run(*driver.metadata([(0, [5, 6, 7])])) is None  # a prefill
        driver.step_logits([(1, [5]), (2, list(range(6, 20)))])
        assert graphs.run(*driver.metadata([(0, [8]), (1, [8]), (2, [9])])) is None  # 3 > max_num_seqs
        assert graphs.run(*driver.metadata([(2, [9])])) is None  # 16 tokens: table wider than 3 blocks
        assert graphs.run(*driver.metadata([(0, [9])])) is not None
    assert not graphs.graphs.keys() - {(None, 1)}


def test_failed_capture_turns_graphs_off(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = load_model(tiny_model_dir("llama"), "float32", "cpu", attention_backend="sdpa")
    driver = PagedDriver(model, num_blocks=64, block_size=4)
    driver.step_logits([(0, [5, 6, 7])])

    def failing(fn: Any, stream: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecodeGraphs(
        model, torch.device("cpu"), 4, max_num_seqs=4, max_blocks_per_seq=8, capture=failing
    )
    with caplog.at_level(logging.WARNING, logger="drift_agent.engine.cuda_graphs"), torch.inference_mode():
        assert graphs.run(*driver.metadata([(0, [8])])) is None
    assert "CUDA graphs turned off" in caplog.text and "not permitted" in caplog.text
    assert graphs.disabled and not graphs.graphs
    with torch.inference_mode():
        assert graphs.run(*driver.metadata([(0, [9])])) is None


def _engine(**kw: Any) -> Any:
    # Imported here: the engine needs pydantic, which the GPU machine may lack; the graph tests above do not.
    from drift_agent.core.config import EngineConfig
    from drift_agent.engine.llm_engine import LLMEngine

    base = dict(model=str(tiny_model_dir("llama3")), block_size=4, num_kv_blocks=256, max_num_seqs=6)
    return LLMEngine(EngineConfig(**(base | kw)))


def _generate(eng: Any, seed: int = 3) -> list[list[int]]:
    from drift_agent.core.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(2, 30))] for _ in range(9)]
    params = [
        SamplingParams(max_tokens=rng.randint(3, 12), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    return [out.token_ids for out in eng.generate(prompts, params)]


def test_engine_on_cpu_captures_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="drift_agent.engine.llm_engine"):
        eng = _engine()
    assert eng.runner.graphs is None and "decode runs eagerly: device is cpu" in caplog.text
    assert _engine(enforce_eager=True).runner.graphs is None


def test_engine_greedy_outputs_equal_with_stand_in_graphs() -> None:
    eager = _engine(enforce_eager=True)
    use_graph_safe_backend(eager.runner.model)
    graphed = _engine()
    use_graph_safe_backend(graphed.runner.model)
    assert graphed.runner.enable_cuda_graphs(6, graphed.max_model_len, capture=eager_capture) is None
    assert _generate(graphed) == _generate(eager)
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.graphs  # decode steps went through the replay path
    assert sum(g.replays for g, _ in graphs.graphs.values()) > 10


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_decode() -> None:
    pytest.importorskip("triton")
    model, _ = load_model(tiny_model_dir("mistral"), "float32", "cuda", attention_backend="triton")
    driver_kv = PagedDriver(model, num_blocks=160, block_size=16, seed=1)
    model.bind_kv_cache([(k.cuda(), v.cuda()) for k, v in driver_kv.kv])  # the driver allocates on CPU
    graphs = DecodeGraphs(model, torch.device("cuda"), 16, max_num_seqs=16, max_blocks_per_seq=16)
    rng = random.Random(0)
    for s in range(16):
        ids, pos, attn = driver_kv.metadata([(s, [rng.randrange(3, 500) for _ in range(rng.randint(1, 90))])])
        with torch.inference_mode():
            model(ids.cuda(), pos.cuda(), _to_cuda(attn))
    for size in (1, 3, 16, 5):
        ids, pos, attn = driver_kv.metadata(
            [(s, [rng.randrange(3, 500)]) for s in rng.sample(range(16), size)]
        )
        ids, pos, attn = ids.cuda(), pos.cuda(), _to_cuda(attn)
        with torch.inference_mode():
            eager = model.compute_logits(model(ids, pos, attn))
            hidden = graphs.run(ids, pos, attn)
            assert hidden is not None, graphs.disabled
            torch.testing.assert_close(model.compute_logits(hidden), eager, atol=1e-3, rtol=1e-3)
    assert graphs.disabled is None and isinstance(next(iter(graphs.graphs.values()))[0], torch.cuda.CUDAGraph)
    # A partition's decode stream (the multiplexed engine's decode lane) gets graphs of its own.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    ids, pos, attn = driver_kv.metadata([(s, [rng.randrange(3, 500)]) for s in range(3)])
    ids, pos, attn = ids.cuda(), pos.cuda(), _to_cuda(attn)
    with torch.inference_mode(), torch.cuda.stream(side):
        eager = model.compute_logits(model(ids, pos, attn))
        hidden = graphs.run(ids, pos, attn)
        assert hidden is not None, graphs.disabled
        logits = model.compute_logits(hidden)
    torch.cuda.synchronize()
    torch.testing.assert_close(logits, eager, atol=1e-3, rtol=1e-3)
    assert (side, 4) in graphs.graphs and (None, 4) in graphs.graphs


def _to_cuda(attn: Any) -> Any:
    from dataclasses import replace

    return replace(
        attn,
        slot_mapping=attn.slot_mapping.cuda(),
        query_start_loc=attn.query_start_loc.cuda(),
        seq_lens=attn.seq_lens.cuda(),
        block_tables=attn.block_tables.cuda(),
    )


@pytest.mark.gpu
@needs_cuda
def test_engine_greedy_equal_with_and_without_cuda_graphs() -> None:
    pytest.importorskip("triton")
    kw = dict(device="cuda", dtype="float32", attention_backend="triton", block_size=16)
    graphed = _engine(**kw)
    assert graphed.runner.graphs is not None
    assert sorted(size for _, size in graphed.runner.graphs.graphs) == capture_sizes(6)  # captured at start
    assert _generate(graphed) == _generate(_engine(enforce_eager=True, **kw))
    assert graphed.runner.graphs.graphs and graphed.runner.graphs.disabled is None

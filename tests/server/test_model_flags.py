"""--generation-config defaults (only for fields a request leaves unset) and --max-logprobs, on a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from drift_agent.core.errors import ModelLoadError
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.server.errors import APIError
from drift_agent.server.protocol import ChatCompletionRequest, CompletionRequest
from drift_agent.server.sampling import apply_model_defaults, sampling_params

from .conftest import MODEL, LiveServer, start_server, tiny_engine_config

DEFAULTS = {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.1, "max_new_tokens": 3}


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_defaults_fill_only_unset_fields() -> None:
    defaults = {"temperature": 0.0, "top_p": 0.5, "top_k": 5, "max_tokens": 3}
    req = _chat(temperature=0.7, top_k=None)
    apply_model_defaults(req, defaults, 20)
    params = sampling_params(req, 0)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.7, 0.5, 5, 3)
    explicit = _chat(max_completion_tokens=9)
    apply_model_defaults(explicit, defaults, 20)
    assert sampling_params(explicit, 0).max_tokens == 9
    completion = CompletionRequest.model_validate({"prompt": "x"})  # 16 is OpenAI's default, not the client's
    apply_model_defaults(completion, defaults, 20)
    assert sampling_params(completion, 0).max_tokens == 3
    chosen = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 16, "top_p": 1.0})
    apply_model_defaults(chosen, defaults, 20)
    assert (sampling_params(chosen, 0).max_tokens, sampling_params(chosen, 0).top_p) == (16, 1.0)
    untouched = _chat()
    apply_model_defaults(untouched, {}, 20)  # --generation-config vllm: today's behaviour
    assert (
        sampling_params(untouched, 0).temperature == 1.0 and sampling_params(untouched, 0).max_tokens is None
    )


def test_max_logprobs_refuses_more_with_param() -> None:
    with pytest.raises(APIError) as info:
        apply_model_defaults(_chat(logprobs=True, top_logprobs=3), {}, 2)
    assert info.value.status == 400 and info.value.param == "top_logprobs"
    with pytest.raises(APIError) as info:
        apply_model_defaults(CompletionRequest.model_validate({"prompt": "x", "logprobs": 3}), {}, 2)
    assert info.value.param == "logprobs"
    apply_model_defaults(_chat(logprobs=True, top_logprobs=2), {}, 2)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("genconfig")
    (folder / "generation_config.json").write_text(
        json.dumps({**DEFAULTS, "eos_token_id": 2, "do_sample": True})
    )
    return folder


@pytest.fixture(scope="module")
def flagged(gen_dir: Path) -> Iterator[LiveServer]:
    engine = AsyncLLMEngine(
        LLMEngine(tiny_engine_config(generation_config=str(gen_dir), max_logprobs=2, num_kv_blocks=64))
    )
    engine.start()
    server = start_server(engine)
    yield server
    server.stop()
    engine.shutdown()


def test_engine_reads_the_generation_config(flagged: LiveServer) -> None:
    defaults = flagged.async_engine.engine.generation_defaults
    assert defaults == {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.1, "max_tokens": 3}


def test_server_applies_defaults_and_the_logprobs_limit(flagged: LiveServer) -> None:
    with flagged.client() as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}
        first = client.post("/v1/chat/completions", json=body).json()
        again = client.post("/v1/chat/completions", json=body).json()
        assert first["usage"]["completion_tokens"] <= 3  # max_new_tokens
        # temperature 0 from the file: greedy, so repeatable without a seed
        assert first["choices"][0]["message"] == again["choices"][0]["message"]
        longer = client.post("/v1/chat/completions", json=body | {"max_tokens": 6, "ignore_eos": True}).json()
        assert longer["usage"]["completion_tokens"] == 6  # an explicit value wins
        resp = client.post("/v1/chat/completions", json=body | {"logprobs": True, "top_logprobs": 3})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"
        resp = client.post("/v1/completions", json={"prompt": "x", "logprobs": 5})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "logprobs"
        ok = client.post("/v1/completions", json={"prompt": "x", "logprobs": 2, "max_tokens": 1})
        assert ok.status_code == 200


def test_default_generation_config_keeps_todays_behaviour(tiny_engine: LLMEngine) -> None:
    # The tiny model's (like the embedded SmolLM2's) generation_config.json holds no sampling values.
    assert tiny_engine.config.generation_config == "auto" and tiny_engine.generation_defaults == {}


def test_bad_generation_config_stops_the_engine(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        LLMEngine(tiny_engine_config(generation_config=str(tmp_path)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ModelLoadError, match="temperature"):
        LLMEngine(tiny_engine_config(generation_config=str(tmp_path)))


def test_vllm_ignores_the_file(gen_dir: Path) -> None:
    from drift_agent.models.loader import load_generation_defaults

    assert load_generation_defaults("vllm", gen_dir) == {}
    assert load_generation_defaults("auto", gen_dir)["max_tokens"] == 3

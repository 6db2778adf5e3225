"""--generation-config defaults (only for fields a request leaves unset) and --max-logprobs, on a real server."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drift_agent.core.errors import ModelLoadError
from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.engine.llm_engine import LLMEngine
from drift_agent.server.errors import APIError
from drift_agent.server.protocol import ChatCompletionRequest, CompletionRequest
from drift_agent.server.sampling import apply_model_defaults, capped, sampling_params

from .conftest import MODEL, LiveServer, start_server, tiny_engine_config

DEFAULTS = {"temperature": 0.0, "top_k": 5, "repetition_penalty": 1.1, "max_new_tokens": 3}
LEN = 128  # the flagged server's context window


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_defaults_fill_only_unset_fields() -> None:
    defaults = {"temperature": 0.0, "top_p": 0.5, "top_k": 5, "max_tokens": 3}
    req = _chat(temperature=0.7, top_k=None)
    apply_model_defaults(req, defaults, 20)
    params = capped(sampling_params(req, 0), defaults.get("max_tokens"))
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.7, 0.5, 5, 3)
    untouched = _chat()
    apply_model_defaults(untouched, {}, 20)  # --generation-config vllm: today's behaviour
    assert (
        sampling_params(untouched, 0).temperature == 1.0 and sampling_params(untouched, 0).max_tokens is None
    )


@pytest.mark.parametrize(
    ("fields", "cap", "expected"),
    [
        ({}, 3, 3),  # chat without max_tokens: the cap (and the context window, in the engine)
        ({"max_completion_tokens": 9}, 3, 3),  # vLLM's min(request, max_new_tokens)
        ({"max_tokens": 2}, 3, 2),
        ({"max_tokens": 9}, None, 9),
        ({}, None, None),
    ],
)
def test_max_new_tokens_caps_max_tokens(fields: dict, cap: int | None, expected: int | None) -> None:
    defaults = {} if cap is None else {"max_tokens": cap}
    req = _chat(**fields)
    apply_model_defaults(req, defaults, 20)
    assert capped(sampling_params(req, 0), cap).max_tokens == expected
    assert req.model_dump(exclude_unset=True).keys() == {"messages", *fields}  # the cap is no client value
    # Completions: OpenAI's implicit 16 counts as the request's value, as in vLLM.
    for body, want in (({"prompt": "x"}, 3), ({"prompt": "x", "max_tokens": 2}, 2)):
        completion = CompletionRequest.model_validate(body)
        apply_model_defaults(completion, {"max_tokens": 3}, 20)
        assert capped(sampling_params(completion, 0), 3).max_tokens == want
    bad = _chat(max_tokens=0)
    apply_model_defaults(bad, {"max_tokens": 3}, 20)
    with pytest.raises(APIError) as info:  # an invalid value of the client's own is still refused
        sampling_params(bad, 0)
    assert info.value.param == "max_tokens"


def test_max_logprobs_refuses_more_with_param() -> None:
    with pytest.raises(APIError) as info:
        apply_model_defaults(_chat(logprobs=True, top_logprobs=3), {}, 2)
    assert info.value.status == 400 and info.value.param == "top_logprobs"
    with pytest.raises(APIError) as info:
        apply_model_defaults(CompletionRequest.model_validate({"prompt": "x", "logprobs": 3}), {}, 2)
    assert info.value.param == "logprobs"
    apply_model_defaults(_chat(logprobs=True, top_logprobs=2), {}, 2)
    # Past OpenAI's 20 (vLLM takes up to --max-logprobs), and -1: no limit.
    apply_model_defaults(_chat(logprobs=True, top_logprobs=50), {}, 50)
    apply_model_defaults(CompletionRequest.model_validate({"prompt": "x", "logprobs": 10**6}), {}, -1)
    assert sampling_params(_chat(logprobs=True, top_logprobs=50), 0).logprobs == 50


def test_max_logprobs_config_range() -> None:
    assert tiny_engine_config(max_logprobs=-1).max_logprobs == -1
    assert tiny_engine_config(max_logprobs=1000).max_logprobs == 1000
    with pytest.raises(ValueError, match="max_logprobs"):
        tiny_engine_config(max_logprobs=-2)


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
        LLMEngine(
            tiny_engine_config(
                generation_config=str(gen_dir), max_logprobs=2, num_kv_blocks=64, max_model_len=LEN
            )
        )
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
        # vLLM's min(request, max_new_tokens): an explicit value is capped too, a smaller one wins.
        longer = client.post("/v1/chat/completions", json=body | {"max_tokens": 6, "ignore_eos": True}).json()
        assert longer["usage"]["completion_tokens"] == 3
        shorter = client.post("/v1/chat/completions", json=body | {"max_tokens": 2, "ignore_eos": True})
        assert shorter.json()["usage"]["completion_tokens"] == 2
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


def _chat_filling(client: Any, room: int) -> list[dict[str, str]]:
    """Chat messages whose rendered prompt leaves exactly `room` tokens of the flagged window."""

    def rendered(words: int) -> int:
        messages = [{"role": "user", "content": "w " * words}]
        return client.post("/tokenize", json={"messages": messages}).json()["count"]

    base, per = rendered(10), (rendered(20) - rendered(10)) / 10
    words = int((LEN - room - base) / per) + 10
    while rendered(words) > LEN - room:
        words -= 1
    while rendered(words + 1) <= LEN - room:
        words += 1
    assert rendered(words) == LEN - room
    return [{"role": "user", "content": "w " * words}]


def test_unset_max_tokens_never_fails_for_the_generation_config(flagged: LiveServer) -> None:
    """A prompt that leaves fewer than max_new_tokens (3) of the window: an unset max_tokens runs to the
    window's end instead of the 400 an explicit max_tokens of 3 gets, as in vLLM."""
    with flagged.client() as client:
        for route, body in (
            ("/v1/completions", {"prompt": list(range(1, LEN - 1)), "max_tokens": None}),
            ("/v1/chat/completions", {"messages": _chat_filling(client, 2)}),
        ):
            resp = client.post(route, json={"model": MODEL, "ignore_eos": True, **body})
            assert resp.status_code == 200, resp.text
            usage = resp.json()["usage"]
            assert usage["prompt_tokens"] == LEN - 2 and usage["completion_tokens"] == 2
            explicit = client.post(route, json={"model": MODEL, **body, "max_tokens": 3})
            assert explicit.status_code == 400
            assert explicit.json()["error"]["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def unlimited() -> Iterator[LiveServer]:
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(max_logprobs=-1, num_kv_blocks=64)))
    engine.start()
    server = start_server(engine)
    yield server
    server.stop()
    engine.shutdown()


def test_max_logprobs_past_openais_20(live: LiveServer, unlimited: LiveServer) -> None:
    """vLLM takes top_logprobs up to --max-logprobs (20 by default, -1: the whole vocabulary), past
    OpenAI's 20, with the official client too."""
    import openai

    kw: dict[str, Any] = dict(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True
    )
    client = openai.OpenAI(base_url=unlimited.base_url, api_key="x", max_retries=0)
    resp = client.chat.completions.create(**kw, top_logprobs=50)
    assert all(len(t.top_logprobs) == 50 for t in resp.choices[0].logprobs.content)
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=1, logprobs=40)
    assert out.choices[0].logprobs.top_logprobs[0]  # keyed by text: tokens that decode alike collapse
    default = openai.OpenAI(base_url=live.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        default.chat.completions.create(**kw, top_logprobs=21)
    assert info.value.body["param"] == "top_logprobs" and "--max-logprobs 20" in info.value.body["message"]


def _serve_args(*flags: str) -> Any:
    from drift_agent.cli import build_parser

    return build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "0", *flags])


def test_disable_log_requests(async_engine: AsyncLLMEngine, caplog: pytest.LogCaptureFixture) -> None:
    """One INFO line per generation request (id and sizes, never the prompt), none with the flag, as vLLM."""
    from drift_agent.server.cli import server_settings
    from drift_agent.server.serving import request_log

    loud, quiet = (
        server_settings(_serve_args(), {}),
        server_settings(_serve_args("--disable-log-requests"), {}),
    )
    assert loud.log_requests and not quiet.log_requests
    for settings in (loud, quiet):
        server = start_server(async_engine, settings)
        try:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger=request_log.name), server.client() as client:
                body = {"model": MODEL, "prompt": "my secret prompt", "max_tokens": 2}
                assert (
                    client.post("/v1/completions", json=body, headers={"x-request-id": "r1"}).status_code
                    == 200
                )
                chat = {"model": MODEL, "messages": [{"role": "user", "content": "secret"}], "max_tokens": 2}
                assert client.post("/v1/chat/completions", json=chat).status_code == 200
                assert client.get("/v1/models").status_code == 200  # not a generation request
            lines = [r.getMessage() for r in caplog.records if r.name == request_log.name]
        finally:
            server.stop()
        if settings.log_requests:
            assert len(lines) == 2 and lines[0].startswith("Received request cmpl-r1:"), lines
            assert "chatcmpl-" in lines[1] and not any("secret" in line for line in lines)
        else:
            assert lines == []


def test_tokenizer_flag_loads_another_tokenizer(tmp_path: Path) -> None:
    """--tokenizer DIR: the tokenizer (here the model's files with another chat template) is the one the
    server renders and counts with, not the model directory's."""
    from drift_agent.commands.engine_args import engine_config_from_args

    model_dir = Path(tiny_engine_config().model)
    # Tokenizer files alone, as vLLM takes them.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "TPL:{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    args = _serve_args("--model", str(model_dir), "--tokenizer", str(tmp_path))
    assert engine_config_from_args(args).tokenizer == str(tmp_path)
    engine = AsyncLLMEngine(LLMEngine(tiny_engine_config(tokenizer=str(tmp_path), num_kv_blocks=64)))
    engine.start()
    server = start_server(engine)
    try:
        with server.client() as client:
            messages = [{"role": "user", "content": "hello"}]
            got = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
            want = engine.engine.tokenizer("TPL:[user]hello", add_special_tokens=False).input_ids
            assert got["tokens"] == want
            detok = client.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"]
            assert detok == "TPL:[user]hello"
            resp = client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2}
            )
            assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == len(want)
    finally:
        server.stop()
        engine.shutdown()

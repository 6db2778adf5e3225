"""The real server on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_usage_matches_tokenizer(client: openai.OpenAI, tiny_engine) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.model == MODEL
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tiny_engine.tokenizer(PROMPT).input_ids)
    assert resp.usage.completion_tokens == 7 == len(choice.logprobs.tokens)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    assert "".join(choice.logprobs.tokens).replace("\ufffd", "") == choice.text.replace("\ufffd", "")
    for tok, lp, top in zip(
        choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True
    ):
        assert lp <= 0 and tok in top and len(top) <= 3


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body=NO_EOS, **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
            **GREEDY,
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_non_stream_and_stream(client: openai.OpenAI, tiny_engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=9, extra_body=NO_EOS, **GREEDY
    )
    rendered = tiny_engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_prompt = len(tiny_engine.tokenizer(rendered, add_special_tokens=False).input_ids)
    assert resp.object == "chat.completion"
    assert resp.usage.prompt_tokens == expected_prompt
    assert resp.usage.completion_tokens == 9
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == resp.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.prompt_tokens == expected_prompt and chunks[-1].usage.completion_tokens == 9


def test_stop_sequence(client: openai.OpenAI) -> None:
    text = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, extra_body=NO_EOS, **GREEDY)
        .choices[0]
        .text
    )
    # A short printable-ASCII stop string from the middle of the greedy output.
    start = next(
        i for i in range(3, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isalnum()
    )
    stop = text[start : start + 2]
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, stop=[stop], extra_body=NO_EOS, **GREEDY
    )
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert choice.model_extra["stop_reason"] == stop

    kept = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=40,
        stop=stop,
        extra_body={**NO_EOS, "include_stop_str_in_output": True},
        **GREEDY,
    )
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, extra_body=NO_EOS
        )
        return r.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_n_choices(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=7, extra_body=NO_EOS
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 24
    assert len({c.text for c in resp.choices}) > 1  # seed + i per choice
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=7, extra_body=NO_EOS
    )
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=5,
        stream=True,
        extra_body=NO_EOS,
    )
    by_index: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            by_index[c.index].append(c)
    for choices in by_index.values():
        assert choices[0].delta.role == "assistant"
        assert [c.finish_reason for c in choices if c.finish_reason] == ["length"]


def test_batched_prompts(client: openai.OpenAI, tiny_engine) -> None:
    ids = tiny_engine.tokenizer("Hello").input_ids
    resp = client.completions.create(
        model=MODEL, prompt=["Hello", "The quick brown fox"], max_tokens=3, extra_body=NO_EOS
    )
    assert len(resp.choices) == 2
    token_resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, extra_body=NO_EOS)
    assert token_resp.usage.prompt_tokens == len(ids)
    echo = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, echo=True, extra_body=NO_EOS, **GREEDY
    )
    assert echo.choices[0].text.startswith("Hello")


def test_chat_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_vllm_extra_params_and_unknown_fields(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=6,
        user="someone",
        extra_body={
            "top_k": 5,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "min_tokens": 6,
            "ignore_eos": False,
            "skip_special_tokens": True,
            "some_future_field": 1,
        },
    )
    assert resp.usage.completion_tokens == 6  # min_tokens == max_tokens: exactly that many


def test_health_ready_version(live: LiveServer) -> None:
    with live.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        assert "version" in http.get("/version").json()
        r = http.post("/tokenize", json={"prompt": PROMPT})
        assert r.json()["count"] == len(r.json()["tokens"])
        assert http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"] == PROMPT


def test_request_id_header_and_raw_sse(live: LiveServer) -> None:
    with live.client() as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body, headers={"x-request-id": "abc"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines)
        assert lines[-1] == "data: [DONE]"
        first = json.loads(lines[0][len("data: ") :])
        assert first["id"] == "cmpl-abc" and first["object"] == "text_completion"

"""Structured outputs through the real server and the official `openai` client: every mode returns text
that parses and validates for several seeds, bad grammars are a 400 naming their field, and a schema fuzz
never yields invalid output or a 5xx."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, LiveServer

pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SEEDS = (0, 1, 2, 7)
MESSAGES: list[Any] = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **({"max_tokens": 200} | kw))


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_strict(client: openai.OpenAI, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    resp = chat(client, response_format=fmt, seed=seed, temperature=1.0)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object(client: openai.OpenAI) -> None:
    """Any JSON object: a random-weight model may nest until max_tokens, but what it closes parses."""
    stopped = 0
    for seed in range(8):
        resp = chat(client, response_format={"type": "json_object"}, seed=seed, max_tokens=400)
        if resp.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(resp.choices[0].message.content), dict)
        else:
            assert resp.choices[0].message.content.startswith("{")
    assert stopped >= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_guided_extras(client: openai.OpenAI, seed: int) -> None:
    out = chat(client, seed=seed, extra_body={"guided_json": PERSON}).choices[0].message.content
    jsonschema.validate(json.loads(out), PERSON)
    # A schema as JSON text, as vLLM also takes it.
    out = chat(client, seed=seed, extra_body={"guided_json": json.dumps(PERSON)}).choices[0].message.content
    jsonschema.validate(json.loads(out), PERSON)
    regex = r"[A-Z][a-z]{2,5}-[0-9]{3}"  # Rust regex: \d is any Unicode digit
    out = chat(client, seed=seed, extra_body={"guided_regex": regex}).choices[0].message.content
    assert re.fullmatch(regex, out), out
    choices = ["yes", "no", 'say "maybe"', "ça va"]
    out = chat(client, seed=seed, extra_body={"guided_choice": choices}).choices[0].message.content
    assert out in choices
    lark = 'start: "(" num (" + " num)* ")"\nnum: /[0-9]{1,3}/\n'
    out = chat(client, seed=seed, extra_body={"guided_grammar": lark}).choices[0].message.content
    assert re.fullmatch(r"\(\d{1,3}( \+ \d{1,3})*\)", out), out
    gbnf = 'root ::= "x" [0-9] [0-9]'
    out = chat(client, seed=seed, extra_body={"guided_grammar": gbnf}).choices[0].message.content
    assert re.fullmatch(r"x\d\d", out), out


@pytest.mark.parametrize(
    "body, check",
    [
        ({"structured_outputs": {"json": PERSON}}, lambda s: jsonschema.validate(json.loads(s), PERSON)),
        ({"structured_outputs": {"regex": r"[0-9]{4}"}}, lambda s: re.fullmatch(r"\d{4}", s) or 1 / 0),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda s: s in ("up", "down") or 1 / 0),
        ({"structured_outputs": {"grammar": 'start: "a"+ "b"'}}, lambda s: re.fullmatch("a+b", s) or 1 / 0),
    ],
)
def test_structured_outputs_spelling(client: openai.OpenAI, body: dict, check: Any) -> None:
    for seed in SEEDS[:2]:
        check(chat(client, seed=seed, extra_body=body).choices[0].message.content)


def test_completions_streaming_and_n(client: openai.OpenAI) -> None:
    """Streaming, n > 1 and seeded reproducibility on /v1/completions."""
    kw: dict[str, Any] = dict(
        model=MODEL, prompt="Person:", max_tokens=150, n=3, seed=5, extra_body={"guided_json": PERSON}
    )
    full = client.completions.create(**kw)
    texts = [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    streamed = [""] * 3
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts  # the same seeds give the same outputs, streamed or not
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    resp = client.completions.create(
        model=MODEL, prompt="x", max_tokens=150, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(resp.choices[0].text), PERSON)


def test_chat_streaming_greedy(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(response_format={"type": "json_object"}, temperature=0)
    whole = chat(client, **kw).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=200, stream=True, **kw
        )
        if c.choices
    ]
    assert "".join(parts) == whole
    assert whole.startswith("{")  # greedy on random weights may nest until max_tokens


def test_chat_streaming_with_n(client: openai.OpenAI) -> None:
    """n > 1 on chat, streamed and not: every choice validates, and the seeded choices agree."""
    kw: dict[str, Any] = dict(n=3, seed=11, max_tokens=200, extra_body={"guided_json": PERSON})
    whole = chat(client, **kw)
    texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    streamed = [""] * 3
    finish: list[str | None] = [None] * 3
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert streamed == texts and finish == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # seed + i per choice


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


@pytest.mark.parametrize(
    "body",
    [
        {"guided_json": PERSON, "guided_whitespace_pattern": "\n"},
        {"structured_outputs": {"json": PERSON, "whitespace_pattern": "\n"}},
        {
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            "guided_whitespace_pattern": "\n",
        },
    ],
)
def test_whitespace_pattern(client: openai.OpenAI, body: dict) -> None:
    """vLLM's guided_whitespace_pattern: the only whitespace between JSON's tokens is what the pattern
    allows (here newlines; the default compact form always has `": "`)."""
    for seed in SEEDS[:3]:
        text = chat(client, seed=seed, extra_body=body).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        assert " " not in _STRINGS.sub('""', text), text
    default = chat(client, seed=0, extra_body={"guided_json": PERSON}).choices[0].message.content
    assert '": ' in default


def test_structured_outputs_json_object(client: openai.OpenAI) -> None:
    body = {"structured_outputs": {"json_object": True}}
    outs = [chat(client, seed=s, max_tokens=400, extra_body=body).choices[0] for s in range(6)]
    done = [c.message.content for c in outs if c.finish_reason == "stop"]
    assert len(done) >= 1
    for text in done:
        assert isinstance(json.loads(text), dict)


def test_free_text_unaffected(client: openai.OpenAI) -> None:
    """A free-text greedy request gives the same tokens alone and next to structured ones."""
    alone = client.completions.create(model=MODEL, prompt="The quick", max_tokens=12, temperature=0)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(chat, client, extra_body={"guided_json": PERSON}) for _ in range(3)]
        mixed = pool.submit(
            client.completions.create, model=MODEL, prompt="The quick", max_tokens=12, temperature=0
        )
        for f in others:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)
        assert mixed.result().choices[0].text == alone.choices[0].text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"guided_regex": "(?=a)b"}, "guided_regex"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": {"type": "string", "format": "made-up"}}, "guided_json"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
            "response_format",
        ),
        ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),  # no JSON constraint
        ({"guided_regex": "a", "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
        ({"guided_json": PERSON, "guided_whitespace_pattern": "("}, "guided_whitespace_pattern"),
        ({"guided_json": PERSON, "guided_whitespace_pattern": "(?= )"}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"json": PERSON, "whitespace_pattern": "["}}, "structured_outputs"),
    ],
)
def test_bad_grammar_is_400_with_param(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, extra_body=body)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body


def test_bad_grammar_leaves_batch_alone(client: openai.OpenAI) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(chat, client, seed=s, extra_body={"guided_json": PERSON}) for s in range(3)]
        for _ in range(3):
            with pytest.raises(openai.BadRequestError):
                chat(client, extra_body={"guided_regex": "(?<=x)y"})
        for f in good:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), PERSON)


# ---- schema fuzz ----------------------------------------------------------------------------------------
_SCALARS = st.sampled_from(
    [
        {"type": "integer"},
        {"type": "integer", "minimum": -5, "maximum": 40},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "string", "maxLength": 6},
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "string", "pattern": "^[a-f0-9]{2,4}$"},
        {"const": "fixed"},
        {"type": "string", "format": "date"},
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "email"},
        {"type": "string", "format": "ipv4"},
        {"type": "string", "format": "uuid"},
    ]
)


def _schemas(children: st.SearchStrategy) -> st.SearchStrategy:
    names = st.sampled_from(["a", "b", "id", "value", "x_y", "ñame"])
    objects = st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.just(props),
                "required": st.lists(st.sampled_from(sorted(props)), unique=True),
                "additionalProperties": st.just(False),
            }
        )
    )
    arrays = st.fixed_dictionaries(
        {"type": st.just("array"), "items": children, "maxItems": st.integers(1, 3)}
    )
    return objects | arrays | st.builds(lambda a, b: {"anyOf": [a, b]}, children, children)


SCHEMAS = st.recursive(_SCALARS, _schemas, max_leaves=5)


# Formats too, as far as jsonschema can check them with what is installed.
FORMATS = jsonschema.FormatChecker()


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 2**16), stream=st.booleans())
def test_schema_fuzz(live: LiveServer, schema: dict, seed: int, stream: bool) -> None:
    client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)
    kw: dict[str, Any] = dict(seed=seed, max_tokens=120, extra_body={"guided_json": schema})
    try:
        if stream:
            text, finish = "", None
            for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kw):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
        else:
            choice = chat(client, **kw).choices[0]
            text, finish = choice.message.content, choice.finish_reason
    except openai.BadRequestError as exc:  # a 400 naming the field is fine; anything else fails the test
        assert exc.body["param"] == "guided_json"
        return
    if finish == "stop":
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(json.loads(text))
    else:  # cut at max_tokens: still a prefix the grammar allowed, never a 5xx
        assert finish == "length"

"""Tool calling through the real server with the official `openai` client. A random tiny model writes no
tool calls of its own: `tool_choice: "required"` and named functions constrain it (structured outputs) to a
valid call, which must come back as `tool_calls`, streamed and not; the parsers themselves are tested on
model-like text in test_tool_calls.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pydantic
import pytest

from drift_agent.engine.async_engine import AsyncLLMEngine
from drift_agent.server.settings import ServerSettings
from tests.server.conftest import MODEL, LiveServer, start_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
LOOKBEHIND = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# Enough room for a constrained call: a random model may take its time before closing the JSON.
ARGS: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 120, "seed": 1}


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hermes(async_engine: AsyncLLMEngine) -> Iterator[openai.OpenAI]:
    server = start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, tool_call_parser="hermes"))
    yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    server.stop()


def check_call(call: Any, tools: list[dict[str, Any]]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id
    assert call.function.name in schemas
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    assert set(args) == set(schemas[call.function.name]["required"])


@pytest.mark.parametrize("seed", range(1, 7))
def test_required_always_yields_a_call(client: openai.OpenAI, seed: int) -> None:
    # One call (parallel_tool_calls false) with bounded arguments: the schema leaves no room but to finish it.
    resp = client.chat.completions.create(
        **(ARGS | {"seed": seed}), tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1 and choice.message.content is None
    check_call(choice.message.tool_calls[0], [WEATHER, TIME])


@pytest.mark.parametrize("seed", range(1, 4))
def test_required_with_parallel_calls(client: openai.OpenAI, seed: int) -> None:
    # The random model may go on adding calls until max_tokens: the complete ones are still calls.
    resp = client.chat.completions.create(
        **(ARGS | {"seed": seed}), tools=[WEATHER, TIME], tool_choice="required"
    )
    choice = resp.choices[0]
    assert choice.message.tool_calls
    assert choice.finish_reason == ("tool_calls" if choice.finish_reason != "length" else "length")
    for call in choice.message.tool_calls:
        check_call(call, [WEATHER, TIME])


def test_named_function(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        **ARGS, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    assert resp.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_calls_assemble_like_the_whole_reply(client: openai.OpenAI, tool_choice: Any) -> None:
    kwargs = ARGS | {"temperature": 0.0, "tools": [WEATHER, TIME], "tool_choice": tool_choice}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    with client.chat.completions.stream(**kwargs) as stream:  # the client's own delta assembly
        for event in stream:
            if event.type == "chunk" and event.chunk.choices:
                finish = event.chunk.choices[0].finish_reason or finish
                for d in event.chunk.choices[0].delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"name": None, "arguments": ""})
                    if d.function and d.function.name:
                        call["name"] = d.function.name
                    call["arguments"] += (d.function.arguments or "") if d.function else ""
        final = stream.get_final_completion()
    assert finish == "tool_calls"
    assembled = final.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in assembled] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    for call in assembled:
        check_call(call, [WEATHER, TIME])


def test_tool_messages_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(**ARGS, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert resp.choices[0].message.content is not None and not resp.choices[0].message.tool_calls


def test_tool_choice_none_is_plain_text(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(**ARGS, tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert not resp.choices[0].message.tool_calls


def test_auto_with_parser_reads_plain_text_as_content(hermes: openai.OpenAI) -> None:
    # The random model writes no <tool_call>: its reply stays content, streamed and not.
    kwargs = ARGS | {"temperature": 0.0, "max_tokens": 12, "tools": [WEATHER]}
    whole = hermes.chat.completions.create(**kwargs).choices[0]
    assert not whole.message.tool_calls and whole.finish_reason in ("stop", "length")
    text = "".join(
        c.choices[0].delta.content or ""
        for c in hermes.chat.completions.create(**kwargs, stream=True)
        if c.choices
    )
    assert text == whole.message.content


def bad(client: openai.OpenAI, **kwargs: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**(ARGS | kwargs))
    return err.value


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
            "tool_choice",
        ),
        (  # valid JSON Schema the grammar compiler cannot take: still the tool's parameters at fault
            {
                "tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": LOOKBEHIND}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            "tools[1].function.parameters",
        ),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),  # no --tool-call-parser
        ({"tools": [WEATHER]}, "tool_choice"),  # defaults to auto
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [WEATHER], "tool_choice": "required", "extra_body": {"guided_regex": "a+"}},
            "tool_choice",
        ),
    ],
)
def test_bad_tool_requests_are_400_with_param(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    err = bad(client, **kwargs)
    assert err.status_code == 400
    assert err.body["param"] == param and err.body["type"] == "invalid_request_error"


def test_bad_requests_do_not_affect_the_batch(client: openai.OpenAI) -> None:
    good = ARGS | {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    unknown = ARGS | {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    invalid = ARGS | {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "city"}}}],
        "tool_choice": "required",
    }

    def run(kwargs: dict[str, Any]) -> Any:
        try:
            return client.chat.completions.create(**kwargs)
        except openai.BadRequestError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, [good, unknown, good, invalid] * 3))
    for i, res in enumerate(results):
        if i % 4 == 1:
            assert isinstance(res, openai.BadRequestError) and res.body["param"] == "tool_choice"
        elif i % 4 == 3:
            assert isinstance(res, openai.BadRequestError)
            assert res.body["param"] == "tools[0].function.parameters"
        else:
            assert res.choices[0].finish_reason == "tool_calls"
            check_call(res.choices[0].message.tool_calls[0], [WEATHER])


# ---- nested schemas, lenient tool schemas, call ids --------------------------------------------------------
class Addr(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    zip: int = pydantic.Field(ge=0, le=99999)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    home: Addr


class Shop(pydantic.BaseModel):  # its own `Addr`: the same name as Person's, another schema
    class Addr(pydantic.BaseModel):
        street: str = pydantic.Field(max_length=8)

    at: Addr


UNIQUE = {
    "type": "function",
    "function": {
        "name": "tag",
        "parameters": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True}
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
    },
}


def _calls(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str | None, list[Any]]:
    """(finish_reason, tool calls) of choice 0, streamed (assembled by the client) or not."""
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.finish_reason, choice.message.tool_calls or []
    with client.chat.completions.stream(**kwargs) as events:
        choice = events.get_final_completion().choices[0]
    return choice.finish_reason, choice.message.tool_calls or []


@pytest.mark.parametrize("stream", [False, True])
def test_required_with_pydantic_tools_using_defs(client: openai.OpenAI, stream: bool) -> None:
    """openai.pydantic_function_tool of nested models puts `$defs` / `$ref` in the parameters (and two tools
    define `Addr` differently): "required" still compiles and every call validates against its tool."""
    tools = [openai.pydantic_function_tool(Person), openai.pydantic_function_tool(Shop)]
    models = {"Person": Person, "Shop": Shop}
    for seed in (1, 2):
        kw = ARGS | {"seed": seed, "max_tokens": 200, "tools": tools, "tool_choice": "required"}
        finish, calls = _calls(client, stream, **kw, parallel_tool_calls=False)
        assert finish == "tool_calls" and len(calls) == 1
        models[calls[0].function.name].model_validate_json(calls[0].function.arguments)
        named = {"type": "function", "function": {"name": "Person"}}
        finish, calls = _calls(client, stream, **(kw | {"tool_choice": named}))
        assert finish == "tool_calls"
        Person.model_validate_json(calls[0].function.arguments)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "tag"}}])
def test_tools_with_unenforceable_keywords_still_work(
    client: openai.OpenAI, choice: Any, stream: bool
) -> None:
    """uniqueItems cannot be enforced by the grammar: guided_json refuses it (400), a tool schema is compiled
    leniently instead, so the call still parses and matches everything else the schema says."""
    bad(client, extra_body={"guided_json": UNIQUE["function"]["parameters"]})  # still a 400 there
    for seed in (1, 2, 3):
        kw = ARGS | {"seed": seed, "tools": [UNIQUE], "tool_choice": choice, "parallel_tool_calls": False}
        finish, calls = _calls(client, stream, **kw)
        assert finish == "tool_calls" and calls[0].function.name == "tag"
        tags = json.loads(calls[0].function.arguments)["tags"]
        assert isinstance(tags, list) and len(tags) <= 2 and set(tags) <= {"a", "b"}


# ---- auto mode with every parser, the model's text forced by guided_choice ---------------------------------
PARIS = {"city": "Paris"}
FORMATS: dict[str, list[tuple[str, str | None, list[tuple[str, dict]]]]] = {
    # (model text, expected content, expected calls)
    "hermes": [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            None,
            [("get_weather", PARIS)],
        ),
        (
            'Let me look. <tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
            "Let me look. ",
            [("get_time", {"zone": "utc"}), ("get_weather", PARIS)],
        ),
        ("It is sunny.", "It is sunny.", []),
    ],
    "llama3_json": [
        (
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
            None,
            [("get_weather", PARIS)],
        ),
        (
            '{"name": "get_time", "parameters": {"zone": "cet"}}; {"name": "get_weather", "parameters": '
            '{"city": "Paris"}}',
            None,
            [("get_time", {"zone": "cet"}), ("get_weather", PARIS)],
        ),
        ("It is sunny.", "It is sunny.", []),
    ],
    "mistral": [
        (
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            None,
            [("get_weather", PARIS)],
        ),
        (
            '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "utc"}}, {"name": "get_weather", '
            '"arguments": {"city": "Paris"}}]',
            None,
            [("get_time", {"zone": "utc"}), ("get_weather", PARIS)],
        ),
        ("It is sunny.", "It is sunny.", []),
    ],
}


@pytest.fixture(scope="module")
def parsers(async_engine: AsyncLLMEngine) -> Iterator[dict[str, openai.OpenAI]]:
    servers = {
        name: start_server(async_engine, ServerSettings(host="127.0.0.1", port=0, tool_call_parser=name))
        for name in FORMATS
    }
    yield {
        name: openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
        for name, s in servers.items()
    }
    for server in servers.values():
        server.stop()


def _check_id(call_id: str, parser: str) -> None:
    if parser == "mistral":  # Mistral's templates need 9 alphanumeric characters
        assert len(call_id) == 9 and call_id.isalnum(), call_id
    else:
        assert call_id.startswith("chatcmpl-tool-"), call_id


@pytest.mark.parametrize("parser", sorted(FORMATS))
def test_auto_tool_calls_with_every_parser(parsers: dict[str, openai.OpenAI], parser: str) -> None:
    """The model's reply forced to the parser's format (guided_choice): n=2 choices come back as tool calls,
    streamed and not, and agree; the call ids are in the parser's style."""
    client, formats = parsers[parser], FORMATS[parser]
    by_text = {text: (content, calls) for text, content, calls in formats}
    kw = ARGS | {
        "max_tokens": 200,
        "n": 2,
        "tools": [WEATHER, TIME],
        "extra_body": {"guided_choice": list(by_text)},
    }
    seen: set[str] = set()
    for seed in range(4):
        whole = client.chat.completions.create(**(kw | {"seed": seed}))
        streamed: dict[int, dict[str, Any]] = {}
        for chunk in client.chat.completions.create(**(kw | {"seed": seed}), stream=True):
            for c in chunk.choices:
                out = streamed.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
                out["content"] += c.delta.content or ""
                out["finish"] = c.finish_reason or out["finish"]
                for d in c.delta.tool_calls or []:
                    call = out["calls"].setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                    call["id"] = d.id or call["id"]
                    call["name"] = (d.function.name if d.function else None) or call["name"]
                    call["arguments"] += (d.function.arguments or "") if d.function else ""
        assert len(whole.choices) == 2
        for choice in whole.choices:
            got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
            matches = [t for t, (content, calls) in by_text.items() if calls == got]
            assert matches, got
            content, _ = by_text[matches[0]]
            seen.add(matches[0])
            assert (choice.message.content or None) == content
            assert choice.finish_reason == ("tool_calls" if got else "stop")
            for call in choice.message.tool_calls:
                _check_id(call.id, parser)
            s = streamed[choice.index]  # seeded: the same text streamed
            assert s["finish"] == choice.finish_reason
            assert (s["content"] or None) == content
            assert [(c["name"], json.loads(c["arguments"])) for c in s["calls"].values()] == got
            for call in s["calls"].values():
                _check_id(call["id"], parser)
    assert len(seen) >= 2  # the seeds picked different replies


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_mistral_ids_for_every_tool_choice(parsers: dict[str, openai.OpenAI], choice: Any) -> None:
    kw = ARGS | {"tools": [WEATHER, TIME], "tool_choice": choice, "parallel_tool_calls": False}
    for stream in (False, True):
        finish, calls = _calls(parsers["mistral"], stream, **kw)
        assert finish == "tool_calls"
        _check_id(calls[0].id, "mistral")
    _check_id(_calls(parsers["hermes"], False, **kw)[1][0].id, "hermes")

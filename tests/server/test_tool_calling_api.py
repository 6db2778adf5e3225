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

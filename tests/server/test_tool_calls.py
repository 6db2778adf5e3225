"""Tool calling without a server: the parsers on model-like text (whole and streamed in pieces), the checks of
`tools` / `tool_choice`, and what the chat template receives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from drift_agent.server import chat_template
from drift_agent.server.errors import APIError
from drift_agent.server.protocol import ChatMessageIn
from drift_agent.server.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedFunctionParser,
    RequiredParser,
    ToolCallParser,
    ToolPlan,
    parse_output,
    plan_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
AUTO = ToolPlan("auto")


def streamed(parser: ToolCallParser, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    """Feed `text` in pieces of `step` characters and assemble the deltas as the openai client does."""
    content, calls = "", {}
    deltas = [parser.feed(text[i : i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    for d in deltas:
        content += d.content
        for c in d.tool_calls:
            call = calls.setdefault(c["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in c:
                assert call["id"] is None, "a call's id is sent once"
                call["id"], call["name"] = c["id"], c["function"]["name"]
                assert c["type"] == "function"
            call["arguments"] += c["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def flat(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


CASES = [
    (
        "hermes",
        HermesParser,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": {"y": "}]"}}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Paris", "x": {"y": "}]"}}), ("get_time", {})],
    ),
    ("hermes", HermesParser, "Just text, a < sign and <tool", "Just text, a < sign and <tool", []),
    (
        "hermes",
        HermesParser,
        "a <tool_call>{not json</tool_call> b",
        "a <tool_call>{not json</tool_call> b",
        [],
    ),
    (
        "llama3_json",
        Llama3JsonParser,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    (
        "llama3_json",
        Llama3JsonParser,
        ' {"type": "function", "name": "get_weather", "parameters": {"city": "Rome \\"old\\""}}',
        None,
        [("get_weather", {"city": 'Rome "old"'})],
    ),
    ("llama3_json", Llama3JsonParser, 'The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),
    (
        "mistral",
        MistralParser,
        'Sure [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}, '
        '{"name": "get_time", "arguments": {}}]',
        "Sure ",
        [("get_weather", {"city": "Nice"}), ("get_time", {})],
    ),
    (
        "mistral",
        MistralParser,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]get_time[ARGS]{}',
        None,
        [("get_weather", {"city": "Lyon"}), ("get_time", {})],
    ),
]


@pytest.mark.parametrize(("name", "cls", "text", "content", "calls"), CASES)
def test_parsers_whole_and_streamed(
    name: str, cls: type[ToolCallParser], text: str, content: str | None, calls: list[tuple[str, Any]]
) -> None:
    got_content, got_calls = parse_output(AUTO, name, text)
    assert got_content == content
    assert flat(got_calls) == calls
    assert all(c["id"] and c["type"] == "function" for c in got_calls)
    for step in (1, 2, 5, 1000):  # token-sized pieces and all at once: always the same reply
        s_content, s_calls = streamed(cls(), text, step)
        assert (s_content or None) == content
        assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls
        # Streamed arguments are the very text of the whole parse.
        assert [c["arguments"] for c in s_calls] == [c["function"]["arguments"] for c in got_calls]


def test_streaming_sends_name_before_arguments_finish() -> None:
    parser = HermesParser()
    first = parser.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Par')
    assert first.tool_calls[0]["function"]["name"] == "get_weather"
    assert first.tool_calls[0]["function"]["arguments"] == '{"city": "Par'
    more = parser.feed('is"}}</tool_call>')
    assert more.tool_calls == [{"index": 0, "function": {"arguments": 'is"}'}}]
    assert not parser.finish()


def test_mistral_ids_are_nine_alphanumerics() -> None:
    _, calls = parse_output(AUTO, "mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()


def test_required_and_named_outputs() -> None:
    text = (
        ' [{"name": "get_weather", "parameters": {"city": "Bern"}}, {"name": "get_time", "parameters": {}}]'
    )
    content, calls = parse_output(ToolPlan("required"), None, text)
    assert content is None and flat(calls) == [("get_weather", {"city": "Bern"}), ("get_time", {})]
    assert streamed(RequiredParser(), text, 3)[1][1]["name"] == "get_time"
    named = ToolPlan("named", function="get_weather")
    content, calls = parse_output(named, None, '{"city": "Bern"}\n')
    assert content is None and flat(calls) == [("get_weather", {"city": "Bern"})]
    s_content, s_calls = streamed(NamedFunctionParser(function="get_weather"), '{"city": "Bern"}\n', 2)
    assert s_content == "" and s_calls[0]["arguments"] == '{"city": "Bern"}'


def test_plan_modes_and_schemas() -> None:
    assert plan_tools(None, None, None).mode == "none"
    assert plan_tools([WEATHER], "none", None).tools == [WEATHER]
    assert plan_tools([WEATHER], None, "hermes").mode == "auto"
    required = plan_tools([WEATHER, TIME], "required", None)
    items = required.schema["items"]["anyOf"]
    assert required.schema["minItems"] == 1 and len(items) == 2
    assert items[0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert items[1]["properties"]["parameters"] == {"type": "object"}
    assert plan_tools([WEATHER], "required", None, parallel_tool_calls=False).schema["maxItems"] == 1
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.mode == "named" and named.function == "get_weather"
    # The tool's schema, leniently compiled (unenforceable keywords ignored), the client's tool untouched.
    assert named.schema == {**WEATHER["function"]["parameters"], "x-guidance": {"lenient": True}}
    assert "x-guidance" not in WEATHER["function"]["parameters"]
    assert required.schema["x-guidance"] == {"lenient": True}


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    node: Any = schema
    for seg in ref.lstrip("#").split("/")[1:]:
        node = node[seg.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_required_hoists_definitions_and_renames_clashes() -> None:
    """`$defs` / `definitions` of every tool move to the combined schema's root (a `#/$defs/..` inside the
    array's items would not resolve otherwise); a name two tools define differently is renamed in the
    second, and every ref still points at its own tool's definition."""
    addr = {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}
    zip_addr = {"type": "object", "properties": {"zip": {"type": "string"}}, "required": ["zip"]}
    person = {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Addr"}, "boss": {"$ref": "#/$defs/Person"}},
        "$defs": {"Addr": addr, "Person": {"type": "object", "properties": {"a": {"$ref": "#/$defs/Addr"}}}},
    }
    shop = {
        "type": "object",
        "properties": {"at": {"$ref": "#/definitions/Addr"}, "self": {"$ref": "#"}},
        "definitions": {"Addr": zip_addr},
    }
    tools = [
        {"type": "function", "function": {"name": "person", "parameters": person}},
        {"type": "function", "function": {"name": "shop", "parameters": shop}},
    ]
    before = json.dumps(tools)
    schema = plan_tools(tools, "required", None).schema
    assert json.dumps(tools) == before  # the client's tools (and the chat template's) are untouched
    items = schema["items"]["anyOf"]
    p_params, s_params = (i["properties"]["parameters"] for i in items)
    assert "$defs" not in p_params and _resolve(schema, p_params["properties"]["home"]["$ref"]) == addr
    # "shop" refers to its own root: it became a definition, its Addr renamed away from person's.
    s_root = _resolve(schema, s_params["$ref"])
    assert _resolve(schema, s_root["properties"]["at"]["$ref"]) == zip_addr
    assert _resolve(schema, s_root["properties"]["self"]["$ref"]) is s_root
    for ref in _refs(schema):
        _resolve(schema, ref)  # every ref resolves from the combined root
    import jsonschema

    ok = [{"name": "person", "parameters": {"home": {"street": "x"}}}, {"name": "shop", "parameters": {}}]
    jsonschema.validate(ok, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "shop", "parameters": {"at": {"street": "x"}}}], schema)


AUTO_TEXTS = {
    "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {}}]',
    "hermes": '<tool_call>{"name": "f", "arguments": {}}</tool_call>',
}


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("server_parser", ["mistral", "hermes", None])
def test_call_ids_follow_the_servers_parser(server_parser: str | None, choice: Any) -> None:
    """Mistral's templates need 9-character alphanumeric ids, whatever the tool_choice of the call."""
    if choice == "auto" and server_parser is None:
        return
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    plan = plan_tools(tools, choice, server_parser)
    if choice == "auto":
        text = AUTO_TEXTS[server_parser or ""]
    else:
        text = '[{"name": "f", "parameters": {}}]' if choice == "required" else "{}"
    _, calls = parse_output(plan, server_parser, text)
    (call,) = calls
    if server_parser == "mistral":
        assert len(call["id"]) == 9 and call["id"].isalnum()
    else:
        assert call["id"].startswith("chatcmpl-tool-")


@pytest.mark.parametrize(
    ("tools", "choice", "parser", "param"),
    [
        ([WEATHER], "auto", None, "tool_choice"),  # auto needs --tool-call-parser
        ([WEATHER], None, None, "tool_choice"),  # tools default to auto
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
        ([WEATHER], {"type": "function"}, None, "tool_choice"),
        ([WEATHER], "sometimes", "hermes", "tool_choice"),
        (None, "required", None, "tool_choice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            "required",
            None,
            "tools[0].function.parameters",
        ),
        (
            [WEATHER, {"type": "function", "function": {"name": "g", "parameters": [1]}}],
            "required",
            None,
            "tools[1].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "bad name"}}],
            "required",
            None,
            "tools[0].function.name",
        ),
        ([WEATHER, WEATHER], "required", None, "tools[1].function.name"),
        ([{"type": "retrieval"}], "required", None, "tools[0]"),
        ([{"type": "function"}], "required", None, "tools[0].function"),
    ],
)
def test_plan_refusals_name_the_field(tools: Any, choice: Any, parser: str | None, param: str) -> None:
    with pytest.raises(APIError) as err:
        plan_tools(tools, choice, parser)
    assert err.value.status == 400 and err.value.param == param


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }} city={{ c.function.arguments.city }}{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}\n{% endfor %}"
)


def test_template_gets_tools_and_tool_messages(tiny_engine: Any) -> None:
    messages = [
        ChatMessageIn(role="user", content="Weather in Paris?"),
        ChatMessageIn(
            role="assistant",
            content=None,
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        ),
        ChatMessageIn(role="tool", content="18 C", tool_call_id="call_1"),
    ]
    text = chat_template.render(
        tiny_engine.tokenizer, messages, chat_template=TOOLS_TEMPLATE, tools=[WEATHER, TIME]
    )
    assert text.startswith("TOOLS:get_weather;get_time;<user>Weather in Paris?")
    # The arguments reach the template as an object (as vLLM hands them over), not as a JSON string.
    assert 'CALL get_weather {"city": "Paris"} city=Paris' in text
    assert "<tool>18 C[for call_1]" in text
    assert not chat_template.render(
        tiny_engine.tokenizer, messages[:1], chat_template=TOOLS_TEMPLATE
    ).startswith("TOOLS")

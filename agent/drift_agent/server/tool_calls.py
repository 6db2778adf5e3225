"""OpenAI tool calling: checking `tools` / `tool_choice`, and turning model output into `tool_calls`.

Parsers (vLLM's names, `--tool-call-parser`) read the formats the served model families write:

- `hermes` (Hermes, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them;
- `llama3_json` (Llama 3.x): the whole reply is `<|python_tag|>`? then `{"name": ..., "parameters": {...}}`
  objects separated by `;`;
- `mistral`: `[TOOL_CALLS]` then a JSON array of calls, or (tokenizer v11+) `[TOOL_CALLS]name[ARGS]{...}`.

`tool_choice: "required"` and a named function do not need a parser: the output is constrained by a JSON schema
(structured outputs) to a JSON array of `{"name", "parameters"}` calls, or to the named function's arguments,
as vLLM does. Every parser works incrementally (`feed` per streamed delta, then `finish`); the non-streamed
reply is the same machine run over the whole text, so both always agree on well-formed output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
import string
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import APIError

PARSERS: tuple[str, ...] = ("hermes", "llama3_json", "mistral")

# OpenAI's rule for function names.
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# The start of a call object whose name comes first, so the name can be sent before the arguments are done.
_HEADER = re.compile(
    r'\s*\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
    r'"(?:arguments|parameters)"\s*:\s*'
)
# Between call objects: whitespace, `,` or `;` (Llama 3), the brackets of a JSON array (Mistral, required).
_SEP = re.compile(r"[\s,;\[\]]*")
_DECODER = json.JSONDecoder()
# Trailing characters of a partial call that may close the arguments' enclosing object: held back.
_HOLD = " \t\r\n}]"


# ---- request side --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: `mode`, the tools for the chat template, and for `required` /
    a named function the JSON schema that constrains the output."""

    mode: Literal["none", "auto", "required", "named"]
    tools: list[dict[str, Any]] | None = None
    schema: dict[str, Any] | None = None
    function: str | None = None
    schema_param: str = "tools"  # the field a schema the grammar compiler refuses came from

    def blame(self, err: APIError) -> APIError:
        """A structured-output error about the schema this plan built names the tools, not `guided_json`."""
        if self.schema is not None and err.param == "guided_json":
            err.param = self.schema_param
            err.message = err.message.replace("guided_json", self.schema_param, 1)
        return err

    @property
    def parses(self) -> bool:
        return self.mode != "none"


def _check_schema(schema: Any, param: str) -> None:
    """`parameters` must be a JSON Schema: refused here rather than failing inside the grammar compiler."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON Schema object", param=param)
    import jsonschema  # imported on first use: only tool requests need it

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise APIError(
            400, f"{param} is not a valid JSON Schema: {exc.message} (at {where})", param=param
        ) from None


def _validated_tools(tools: list[Any]) -> list[dict[str, Any]]:
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(400, f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError(
                400,
                f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name!r}",
                param=f"{where}.function.name",
            )
        if name in names:
            raise APIError(400, f"duplicate function name {name!r}", param=f"{where}.function.name")
        names.add(name)
        if "parameters" in fn:
            _check_schema(fn["parameters"], f"{where}.function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise APIError(
                400, f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
    return tools


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# Tool schemas are guaranteed-parseable calls, not validators: keywords the grammar compiler cannot enforce
# (uniqueItems, not, ...) are ignored for them instead of refusing the tool (guided_json still refuses them).
_LENIENT = {"lenient": True}
_DEF_KEYS = ("$defs", "definitions")
# Keywords whose values are data, not schemas: a `$ref` key in them is no reference.
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})


def _lenient(schema: dict[str, Any]) -> dict[str, Any]:
    guidance = schema.get("x-guidance")
    return {**schema, "x-guidance": {**(guidance if isinstance(guidance, dict) else {}), **_LENIENT}}


def _pointer(segments: list[str]) -> str:
    return "#" + "".join("/" + s.replace("~", "~0").replace("/", "~1") for s in segments)


def _segments(ref: str) -> list[str]:
    """The JSON-pointer segments of a local `$ref` ("#/a/b")."""
    path = urllib.parse.unquote(ref[1:])
    return [s.replace("~1", "/").replace("~0", "~") for s in path.split("/")[1:]] if path else []


def _hoist(params: dict[str, Any], fn_name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters for embedding in the "required" array schema: its `$defs` / `definitions` move
    into `defs` (the combined schema's `$defs`), renamed where another tool took the name, and its local
    `$ref`s are rewritten to match (a `#/$defs/...` inside an embedded schema would resolve against the
    combined root, as vLLM's hoisting also avoids). A ref into the tool's own root (`#`, `#/properties/..`)
    makes the whole tool a definition of its own. Never edits the client's tools."""
    params = copy.deepcopy(params)
    local: dict[tuple[str, str], Any] = {}
    for key in _DEF_KEYS:
        found = params.pop(key, None)
        if isinstance(found, dict):
            local.update({(key, name): sub for name, sub in found.items()})

    def fresh(name: str) -> str:
        new, i = name, 1
        while new in defs or new in taken:
            new, i = f"{fn_name}__{name}" + (f"_{i}" if i > 1 else ""), i + 1
        return new

    taken: set[str] = set()
    renamed: dict[tuple[str, str], str] = {}
    for key, name in local:
        renamed[(key, name)] = fresh(name)
        taken.add(renamed[(key, name)])
    root = fresh(f"{fn_name}__parameters")
    needs_root = False

    def rewrite(node: Any) -> Any:
        nonlocal needs_root
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                seg = _segments(v)
                if len(seg) >= 2 and (seg[0], seg[1]) in renamed:
                    v = _pointer(["$defs", renamed[(seg[0], seg[1])], *seg[2:]])
                else:
                    needs_root = True
                    v = _pointer(["$defs", root, *seg])
            elif k not in _DATA_KEYS:
                v = rewrite(v)
            out[k] = v
        return out

    params = rewrite(params)
    for (key, name), sub in local.items():
        defs[renamed[(key, name)]] = rewrite(sub)
    if needs_root:
        defs[root] = params
        return {"$ref": _pointer(["$defs", root])}
    return params


def _required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool | None) -> dict[str, Any]:
    """The JSON schema of a "required" reply: an array of `{"name", "parameters"}` calls (vLLM's)."""
    defs: dict[str, Any] = {}
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": _hoist(_parameters(t), t["function"]["name"], defs),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,  # nothing else to write: the call ends when its arguments do
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
        "x-guidance": _LENIENT,
    }
    if defs:
        schema["$defs"] = defs
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def plan_tools(
    tools: list[Any] | None, tool_choice: Any, parser: str | None, parallel_tool_calls: bool | None = None
) -> ToolPlan:
    """Validate `tools` and `tool_choice` (each a 400 naming its field) and decide how the reply is read."""
    if not tools:
        if tool_choice is None or tool_choice == "none":
            return ToolPlan("none")
        raise APIError(400, "tool_choice needs tools: no tools were given", param="tool_choice")
    checked = _validated_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", checked)
    if choice == "auto":
        if parser is None:
            raise APIError(
                400,
                '"auto" tool choice requires the server to be started with --tool-call-parser (and '
                '--enable-auto-tool-choice, as vLLM); use tool_choice "required" or a named function instead',
                param="tool_choice",
            )
        return ToolPlan("auto", checked)
    if choice == "required":
        where = "tools[0].function.parameters" if len(checked) == 1 else "tools"
        return ToolPlan(
            "required", checked, _required_schema(checked, parallel_tool_calls), schema_param=where
        )
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise APIError(
                400,
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        for i, tool in enumerate(checked):
            if tool["function"]["name"] == name:
                schema = _lenient(_parameters(tool))
                return ToolPlan("named", checked, schema, name, f"tools[{i}].function.parameters")
        known = ", ".join(t["function"]["name"] for t in checked)
        raise APIError(
            400, f"tool_choice names function {name!r}, which is not in tools ({known})", param="tool_choice"
        )
    raise APIError(
        400,
        f'tool_choice must be "none", "auto", "required" or a named function, got {choice!r}',
        param="tool_choice",
    )


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` with their `arguments` as objects, as chat templates (`| tojson`) expect them
    and as vLLM hands them over; arguments that are not JSON stay strings."""
    for msg in messages:
        calls = msg.get("tool_calls")
        if not isinstance(calls, list):
            continue
        fixed = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                with contextlib.suppress(ValueError):
                    fn = {**fn, "arguments": json.loads(fn["arguments"])}
                call = {**call, "function": fn}
            fixed.append(call)
        msg["tool_calls"] = fixed
    return messages


# ---- output side ---------------------------------------------------------------------------------------
def _random_id(style: str | None) -> str:
    """A tool-call id in the style of the server's parser (`--tool-call-parser`), whatever the tool_choice."""
    if style == "mistral":  # Mistral's templates insist on 9 alphanumeric characters
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _as_call(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) of a parsed call object, None when it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    if not isinstance(name, str) or not name or not isinstance(args, dict | str | None):
        return None
    return name, {} if args is None else args


@dataclass
class _Open:
    """A call whose header was sent before its object was complete (streaming)."""

    index: int
    args_start: int  # offset of the arguments' value in the text
    sent: int = 0  # characters of the arguments sent
    done: bool = False  # the arguments' value is complete (and all of it sent)


@dataclass
class _Objects:
    """Scan state of a run of JSON call objects."""

    pos: int
    open: _Open | None = None
    started: int = 0  # calls begun in this run


@dataclass
class Delta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: Delta) -> Delta:
        """`other` appended (a call's arguments continued in place rather than as a second entry)."""
        self.content += other.content
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last["index"] == call["index"] and set(call) == {"index", "function"}:
                last["function"]["arguments"] += call["function"]["arguments"]
            else:
                self.tool_calls.append(call)
        return self

    def as_delta(self) -> dict[str, Any]:
        """The chunk's `delta`."""
        out: dict[str, Any] = {}
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ToolCallParser(ABC):
    """Incremental parser of one choice's output: `feed` each delta (the text so far grows), `finish` at the
    end. `eager` (streaming) sends a call's name and arguments as they arrive; otherwise a call is sent only
    once complete, and what never parses is content."""

    name = "base"

    def __init__(self, eager: bool = True, id_style: str | None = None) -> None:
        self.eager = eager
        self.id_style = id_style or self.name  # the server's parser: its ids, even for required/named
        self.text = ""
        self.pos = 0
        self.num_calls = 0
        self._ws = ""  # whitespace after a call, sent only if more content follows
        self._out = Delta()
        self._accum = Delta()  # non-eager: everything produced, for parse_output

    # -- public
    def feed(self, delta: str) -> Delta:
        self.text += delta
        self._scan(final=False)
        return self._take()

    def finish(self) -> Delta:
        self._scan(final=True)
        return self._take()

    # -- for subclasses
    @abstractmethod
    def _scan(self, final: bool) -> None:
        """Consume `self.text` from `self.pos`: emit content and calls; `final` at the end of the output."""

    def _take(self) -> Delta:
        out, self._out = self._out, Delta()
        if not self.eager:  # parse_output reads the whole reply from _accum at the end
            self._accum.content += out.content
            self._accum.tool_calls.extend(out.tool_calls)
            return Delta()
        return out

    def _content(self, text: str) -> None:
        if not text:
            return
        if self.num_calls and text.isspace():  # e.g. the newline between two calls
            self._ws += text
            return
        self._out.content += self._ws + text
        self._ws = ""

    def _start_call(self, name: str) -> int:
        index = self.num_calls
        self.num_calls += 1
        self._out.tool_calls.append(
            {
                "index": index,
                "id": _random_id(self.id_style),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        )
        return index

    def _args(self, index: int, text: str) -> None:
        if not text:
            return
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last["index"] == index:
            last["function"]["arguments"] += text
        else:
            self._out.tool_calls.append({"index": index, "function": {"arguments": text}})

    def _stream_args(self, op: _Open, end: int) -> None:
        """Send what is certainly part of the arguments' value `text[op.args_start:...]` so far."""
        if op.done or op.args_start >= end or self.text[op.args_start] != "{":
            return
        text = self.text[:end]
        try:
            _, args_end = _DECODER.raw_decode(text, op.args_start)
        except ValueError:
            avail = text[op.args_start :].rstrip(_HOLD)
        else:
            avail, op.done = text[op.args_start : args_end], True
        if len(avail) > op.sent:
            self._args(op.index, avail[op.sent :])
            op.sent = len(avail)

    def _raw_args(self, start: int, end: int) -> str | None:
        """The arguments exactly as written, when they are an object after the name."""
        m = _HEADER.match(self.text, start, end)
        if m is None or self.text[m.end() : m.end() + 1] != "{":
            return None
        try:
            _, args_end = _DECODER.raw_decode(self.text[:end], m.end())
        except ValueError:
            return None
        return self.text[m.end() : args_end]

    def _objects(self, st: _Objects, end: int, final: bool) -> bool:
        """Parse call objects in `text[st.pos:end]`; False at something that is not a call (st.pos there)."""
        text = self.text[:end]
        while True:
            p = _SEP.match(text, st.pos).end()
            if p >= end:
                if final or st.open is None:
                    st.pos = p
                return True
            if text[p] != "{":
                st.pos = p
                return False
            try:
                obj, obj_end = _DECODER.raw_decode(text, p)
            except ValueError:
                st.pos = p
                if final:
                    return False
                if self.eager:
                    self._stream_open(st, p, end)
                return True
            call = _as_call(obj)
            if call is None:
                st.pos = p
                return False
            name, args = call
            raw = self._raw_args(p, obj_end)
            if raw is None:
                raw = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            if st.open is None:
                index, sent = self._start_call(name), 0
            else:
                index, sent = st.open.index, st.open.sent
            self._args(index, raw[sent:])
            st.open, st.pos = None, obj_end
            st.started += 1

    def _stream_open(self, st: _Objects, p: int, end: int) -> None:
        if st.open is None:
            m = _HEADER.match(self.text, p, end)
            if m is None:
                return
            st.open = _Open(self._start_call(json.loads(f'"{m.group(1)}"')), m.end())
            st.started += 1
        self._stream_args(st.open, end)


def _partial_tail(text: str, start: int, tag: str) -> int:
    """Length of the longest end of `text[start:]` that begins `tag` (held back: it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[len(text) - n :]):
            return n
    return 0


class _TaggedParser(ToolCallParser):
    """Content, with calls between a start tag and an (optional) end tag."""

    start_tag = ""
    end_tag: str | None = None

    def __init__(self, eager: bool = True) -> None:
        super().__init__(eager)
        self._in_call = False
        self._block_start = 0
        self._st = _Objects(0)

    def _scan(self, final: bool) -> None:
        text = self.text
        while True:
            if not self._in_call:
                i = text.find(self.start_tag, self.pos)
                if i < 0:
                    safe = len(text) if final else len(text) - _partial_tail(text, self.pos, self.start_tag)
                    self._content(text[self.pos : safe])
                    self.pos = safe
                    return
                self._content(text[self.pos : i])
                self._in_call, self._block_start = True, i
                self.pos = i + len(self.start_tag)
                self._st = _Objects(self.pos)
                continue
            j = text.find(self.end_tag, self._st.pos) if self.end_tag else -1
            if j < 0 and self.start_tag:  # Mistral: another start tag ends the block
                k = text.find(self.start_tag, self._st.pos)
                j = k if k >= 0 and not self.end_tag else j
            closed = j >= 0
            if closed:
                end = j
            elif final:
                end = len(text)
            else:
                tails = [_partial_tail(text, self._st.pos, t) for t in (self.end_tag, self.start_tag) if t]
                end = len(text) - max(tails, default=0)
            ok = self._block(end, final or closed)
            if not closed and not final:
                if not ok:  # something other than a call in the block: wait for its end to decide
                    return
                return
            if not ok:  # not a call after all: the block's text is content, as vLLM returns it
                start = self._block_start if self._st.started == 0 else self._st.pos
                self._content(text[start : j + len(self.end_tag or "") if closed else len(text)])
            self._in_call = False
            self.pos = (j + len(self.end_tag or "")) if closed else len(text)
            if not closed:
                return

    def _block(self, end: int, final: bool) -> bool:
        return self._objects(self._st, end, final)


class HermesParser(_TaggedParser):
    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"


class MistralParser(_TaggedParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}` per call."""

    name = "mistral"
    start_tag = "[TOOL_CALLS]"
    _ARGS = "[ARGS]"
    _CALL_ID = "[CALL_ID]"

    def _block(self, end: int, final: bool) -> bool:
        st, text = self._st, self.text
        first = _SEP.match(text, st.pos).end() if st.pos < end else end
        if first >= end:
            return True
        if first < end and text[first] in "[{":
            return self._objects(st, end, final)
        # v11: name[ARGS]{...} (optionally name[CALL_ID]id[ARGS]{...})
        if st.open is None:
            k = text.find(self._ARGS, st.pos, end)
            if k < 0:
                return not final
            name = text[st.pos : k].split(self._CALL_ID)[0].strip()
            if not _NAME.match(name):
                return False
            args_start = k + len(self._ARGS)
            if not self.eager:
                try:
                    _, args_end = _DECODER.raw_decode(text[:end], args_start)
                except ValueError:
                    return False
                index = self._start_call(name)
                self._args(index, text[args_start:args_end])
                st.pos, st.started = args_end, st.started + 1
                return text[args_end:end].strip() == ""
            st.open = _Open(self._start_call(name), args_start)
            st.started += 1
        self._stream_args(st.open, end)
        if st.open.done:
            st.pos = st.open.args_start + st.open.sent
            st.open = None
            return text[st.pos : end].strip() == "" or not final
        return not final


class Llama3JsonParser(ToolCallParser):
    """Llama 3.x: a reply that starts with `<|python_tag|>` or `{` is tool calls; any other is content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def __init__(self, eager: bool = True) -> None:
        super().__init__(eager)
        self._mode: Literal["undecided", "content", "calls"] = "undecided"
        self._st = _Objects(0)

    def _scan(self, final: bool) -> None:
        text = self.text
        if self._mode == "undecided":
            body = text.lstrip()
            offset = len(text) - len(body)
            if body.startswith(self.tag):
                self._mode, self._st = "calls", _Objects(offset + len(self.tag))
            elif body.startswith("{"):
                self._mode, self._st = "calls", _Objects(offset)
            elif not final and (not body or self.tag.startswith(body)):
                return
            else:
                self._mode = "content"
        if self._mode == "calls":
            if self._objects(self._st, len(text), final):
                return
            if not final and not self.eager and self._st.pos < len(text):
                return  # parse(): decided at the end
            self._mode, self.pos = "content", (0 if self._st.started == 0 else self._st.pos)
        self._content(text[self.pos :])
        self.pos = len(text)


class NamedFunctionParser(ToolCallParser):
    """tool_choice naming a function: the whole (schema-constrained) output is its arguments."""

    name = "named"

    def __init__(self, eager: bool = True, function: str = "", id_style: str | None = None) -> None:
        super().__init__(eager, id_style)
        self.function = function
        self._sent = 0

    def _scan(self, final: bool) -> None:
        if not final and not self.eager:
            return
        if self.num_calls == 0:
            self._start_call(self.function)
        args = self.text.strip()  # trailing whitespace may still be followed by arguments: held until then
        if len(args) > self._sent:
            self._args(0, args[self._sent :])
            self._sent = len(args)


class RequiredParser(ToolCallParser):
    """tool_choice "required": the (schema-constrained) output is a JSON array of {"name", "parameters"}."""

    name = "required"

    def __init__(self, eager: bool = True, id_style: str | None = None) -> None:
        super().__init__(eager, id_style)
        self._st = _Objects(0)
        self._failed = False

    def _scan(self, final: bool) -> None:
        if self._failed:
            self._content(self.text[self.pos :])
            self.pos = len(self.text)
            return
        if not self._objects(self._st, len(self.text), final) and (final or self.eager):
            self._failed, self.pos = True, self._st.pos
            self._content(self.text[self.pos :])
            self.pos = len(self.text)


_PARSER_CLASSES: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def parser_for(plan: ToolPlan, parser: str | None, eager: bool = True) -> ToolCallParser | None:
    """The parser of one choice's output under `plan`; None when the reply is plain content."""
    if plan.mode == "named":
        return NamedFunctionParser(eager, function=plan.function or "", id_style=parser)
    if plan.mode == "required":
        return RequiredParser(eager, id_style=parser)
    if plan.mode == "auto" and parser is not None:
        return _PARSER_CLASSES[parser](eager)
    return None


def parse_output(plan: ToolPlan, parser: str | None, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a complete reply."""
    p = parser_for(plan, parser, eager=False)
    if p is None:
        return text, []
    p.feed(text)
    p.finish()
    acc = p._accum
    calls: dict[int, dict[str, Any]] = {}
    for c in acc.tool_calls:
        call = calls.setdefault(c["index"], {"id": None, "type": "function", "function": {"arguments": ""}})
        if "id" in c:
            call["id"] = c["id"]
        fn = c.get("function", {})
        if "name" in fn:
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments", "")
    content = acc.content
    if calls and not content.strip():
        content = ""
    return content or None, [calls[i] for i in sorted(calls)]

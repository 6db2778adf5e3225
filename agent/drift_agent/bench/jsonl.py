"""The `jsonl` workload: a user's own prompts and conversations, one JSON object per line.

Accepted objects (a whole-file JSON array of them is accepted too, e.g. a ShareGPT dump):
- {"prompt": "...", "output_len": 128}                         one request
- {"messages": [{"role": "user", "content": "..."}, ...]}        one chat request sent with these messages
- {"turns": ["first question", "follow-up", ...], "output_len": 128 | [..], "think_time_s": 1.0}
                                                                  a multi-turn session
- {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
                                                                  ShareGPT format: a session of the human turns,
                                                                  each answer's target length = that reply's length
`output_len` (alias `max_tokens`) defaults to --output-len. Token counts use the tokenizer when one is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import BenchError
from .prompts import PromptBuilder
from .workloads import RequestSpec


class JsonlError(BenchError):
    """The workload file is missing or malformed; the message names file and line."""


def _out_len(obj: dict[str, Any], default: int, where: str) -> Any:
    value = obj.get("output_len", obj.get("max_tokens", default))
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise JsonlError(f"{where}: output_len must be a positive integer (or a list of them), got {value!r}")
    return value


def _render(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _session(
    turns: list[str], outs: list[int], think: float, sid: str, builder: PromptBuilder
) -> list[RequestSpec]:
    specs, history = [], 0
    for t, (text, n_out) in enumerate(zip(turns, outs, strict=True)):
        n_user = builder.count(text)
        specs.append(
            RequestSpec(
                f"{sid}t{t}",
                text,
                history + n_user,
                n_out,
                session_id=sid,
                turn=t,
                new_prompt_len=n_user,
                think_time_s=think if t > 0 else 0.0,
            )
        )
        history += n_user + n_out
    return specs


def parse_object(
    obj: Any, index: int, default_output_len: int, builder: PromptBuilder, where: str
) -> list[RequestSpec]:
    """The requests of one JSON object (see the module docstring for the accepted shapes)."""
    if not isinstance(obj, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = f"j{index}"
    if isinstance(obj.get("prompt"), str):
        out = _out_len(obj, default_output_len, where)
        if isinstance(out, list):
            raise JsonlError(f"{where}: a single prompt takes one output_len, not a list")
        n = builder.count(obj["prompt"])
        return [RequestSpec(rid, obj["prompt"], n, out, session_id=rid, new_prompt_len=n)]
    if "messages" in obj:
        msgs = obj["messages"]
        if not (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise JsonlError(f"{where}: messages must be a non-empty list of {{role, content}} strings")
        out = _out_len(obj, default_output_len, where)
        if isinstance(out, list):
            raise JsonlError(f"{where}: a messages request takes one output_len, not a list")
        text = _render(msgs)
        n = builder.count(text)
        return [RequestSpec(rid, text, n, out, session_id=rid, new_prompt_len=n, messages=tuple(msgs))]
    think = obj.get("think_time_s", 0.0)
    if not isinstance(think, int | float) or think < 0:
        raise JsonlError(f"{where}: think_time_s must be a number >= 0, got {think!r}")
    if "turns" in obj:
        turns = obj["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise JsonlError(f"{where}: turns must be a non-empty list of strings")
        out = _out_len(obj, default_output_len, where)
        outs = out if isinstance(out, list) else [out] * len(turns)
        if len(outs) != len(turns):
            raise JsonlError(f"{where}: {len(outs)} output lengths for {len(turns)} turns")
        return _session(turns, outs, float(think), rid, builder)
    if "conversations" in obj:
        conv = obj["conversations"]
        if not (
            isinstance(conv, list)
            and all(isinstance(c, dict) and isinstance(c.get("value"), str) for c in conv)
        ):
            raise JsonlError(f"{where}: conversations must be a list of {{from, value}} objects")
        turns, outs = [], []
        for i, c in enumerate(conv):
            nxt = conv[i + 1] if i + 1 < len(conv) else None
            if (
                c.get("from") in ("human", "user")
                and nxt is not None
                and nxt.get("from") in ("gpt", "assistant")
            ):
                turns.append(c["value"])
                outs.append(max(1, builder.count(nxt["value"])))
        if not turns:
            raise JsonlError(f"{where}: conversation has no human turn followed by a reply")
        return _session(turns, outs, float(think), rid, builder)
    raise JsonlError(f"{where}: object needs one of the keys prompt, messages, turns, conversations")


def load_jsonl(
    path: str | Path, num_requests: int, default_output_len: int, builder: PromptBuilder
) -> list[RequestSpec]:
    """Up to `num_requests` requests from the file in file order (the last session may be cut short)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JsonlError(f"cannot read workload file {p}: {e}") from e
    items: list[tuple[Any, str]]
    if text.lstrip().startswith("["):
        try:
            items = [(o, f"{p}[{i}]") for i, o in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise JsonlError(f"{p}: invalid JSON array: {e}") from e
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), f"{p}:{lineno}"))
            except json.JSONDecodeError as e:
                raise JsonlError(f"{p}:{lineno}: invalid JSON: {e.msg}") from e
    specs: list[RequestSpec] = []
    for index, (obj, where) in enumerate(items):
        if len(specs) >= num_requests:
            break
        specs.extend(
            parse_object(obj, index, default_output_len, builder, where)[: num_requests - len(specs)]
        )
    if not specs:
        raise JsonlError(f"{p}: no requests in file")
    return specs

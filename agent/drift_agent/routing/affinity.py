"""The affinity key of an OpenAI request: what keeps one conversation on one backend, so the later turns hit
the prefix cache the earlier ones filled there.

In order: the client's `x-session-id` header; the body's `user` field; for chat, a hash of the messages up to
and including the first user message (the system prompt and the opening question come back unchanged in
every later turn of a conversation, while the tail grows); for completions, a hash of the prompt's first
`PROMPT_CHARS` characters (or of its first `PROMPT_TOKENS` token ids). None when the request has none of
these. Hashes are stable across processes (blake2b, not `hash()`), so router replicas agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

SESSION_HEADER = "x-session-id"
PROMPT_CHARS = 256
PROMPT_TOKENS = 64


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _nonempty_str(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _chat_opening(messages: list[Any]) -> list[Any]:
    """The messages up to and including the first user message (all of them when there is none)."""
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return messages[: i + 1]
    return messages


def _prompt_key(prompt: Any) -> str | None:
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch of prompts: its first one
    if isinstance(prompt, str) and prompt:
        return "prompt:" + _digest(prompt[:PROMPT_CHARS])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return "tokens:" + _digest(prompt[:PROMPT_TOKENS])
    return None


def affinity_key(body: dict, headers: Mapping[str, str]) -> str | None:
    """The key that keeps this request's conversation on one backend (see the module docstring); pure."""
    session = _nonempty_str(_header(headers, SESSION_HEADER))
    if session is not None:
        return "session:" + session
    if not isinstance(body, dict):
        return None
    user = _nonempty_str(body.get("user"))
    if user is not None:
        return "user:" + user
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return "chat:" + _digest(_chat_opening(messages))
    return _prompt_key(body.get("prompt"))

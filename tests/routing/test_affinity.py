"""`affinity_key`: one conversation, one key; different conversations, different keys."""

from __future__ import annotations

import hashlib
import json

from drift_agent.routing import affinity_key

SYSTEM = {"role": "system", "content": "You are terse."}
Q1 = {"role": "user", "content": "What is paged attention?"}


def test_session_header_first_then_user() -> None:
    body = {"user": "alice", "messages": [Q1]}
    assert affinity_key(body, {"x-session-id": "s-42"}) == "session:s-42"
    assert affinity_key(body, {"X-Session-Id": "s-42"}) == "session:s-42"  # a plain dict: any case
    assert affinity_key(body, {"x-session-id": "  "}) == "user:alice"  # blank: ignored
    assert affinity_key(body, {}) == "user:alice"
    assert affinity_key({"user": "", "messages": [Q1]}, {}).startswith("chat:")


def test_chat_key_is_the_opening_of_the_conversation() -> None:
    turn1 = {"messages": [SYSTEM, Q1]}
    turn2 = {
        "messages": [
            SYSTEM,
            Q1,
            {"role": "assistant", "content": "KV in blocks."},
            {"role": "user", "content": "More?"},
        ]
    }
    key = affinity_key(turn1, {})
    assert key is not None and key.startswith("chat:")
    assert affinity_key(turn2, {}) == key
    assert affinity_key({"messages": [SYSTEM, {"role": "user", "content": "Other question"}]}, {}) != key
    assert affinity_key({"messages": [{"role": "system", "content": "Be verbose."}, Q1]}, {}) != key
    # Content parts hash too; no user message at all: all of the messages.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert affinity_key(parts, {}) == affinity_key(parts, {})
    assert affinity_key({"messages": [SYSTEM]}, {}) is not None


def test_completion_key_is_the_prompt_opening() -> None:
    head = "x" * 256
    key = affinity_key({"prompt": head + "first tail"}, {})
    assert key == affinity_key({"prompt": head + "another tail"}, {})
    assert key == affinity_key({"prompt": [head + "batched", "second"]}, {})
    assert key != affinity_key({"prompt": "y" + head}, {})
    tokens = list(range(64))
    tkey = affinity_key({"prompt": [*tokens, 1, 2]}, {})
    assert tkey is not None and tkey.startswith("tokens:")
    assert tkey == affinity_key({"prompt": [*tokens, 9]}, {}) == affinity_key({"prompt": [[*tokens, 5]]}, {})
    assert tkey != affinity_key({"prompt": [1, *tokens]}, {})


def test_no_key() -> None:
    assert affinity_key({}, {}) is None
    assert affinity_key({"prompt": ""}, {}) is None
    assert affinity_key({"prompt": []}, {}) is None
    assert affinity_key({"messages": []}, {}) is None
    assert affinity_key({"prompt": 5}, {}) is None


def test_keys_are_stable_across_processes() -> None:
    # blake2b of the canonical JSON, not Python's per-process salted hash(): router replicas agree.
    expected = hashlib.blake2b(json.dumps("hello").encode(), digest_size=12).hexdigest()
    assert affinity_key({"prompt": "hello"}, {}) == "prompt:" + expected

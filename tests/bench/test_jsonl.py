"""The jsonl workload: every accepted shape, and a clear error naming file and line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drift_agent.bench.jsonl import JsonlError, load_jsonl
from drift_agent.bench.prompts import WordPrompts
from drift_agent.bench.workloads import group_sessions

W = WordPrompts()


def write(tmp_path: Path, *lines: object, raw: str | None = None) -> Path:
    p = tmp_path / "work.jsonl"
    p.write_text(raw if raw is not None else "\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def test_all_shapes(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        {"prompt": "tell me a story", "output_len": 32},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"turns": ["first question", "and a follow-up"], "output_len": [10, 20], "think_time_s": 1.5},
        {
            "conversations": [
                {"from": "human", "value": "what is a cat"},
                {"from": "gpt", "value": "a small domesticated carnivorous mammal with soft fur"},
                {"from": "human", "value": "and a dog"},
                {"from": "gpt", "value": "a loyal animal"},
            ]
        },
    )
    specs = load_jsonl(p, 100, default_output_len=64, builder=W)
    assert len(specs) == 1 + 1 + 2 + 2
    single, chat = specs[0], specs[1]
    assert (single.prompt, single.output_len, single.prompt_len) == (
        "tell me a story",
        32,
        W.count("tell me a story"),
    )
    assert chat.messages is not None and chat.messages[0]["role"] == "system" and chat.output_len == 64
    sessions = group_sessions(specs)
    turns = sessions[2]
    assert [t.output_len for t in turns] == [10, 20]
    assert [t.think_time_s for t in turns] == [0.0, 1.5]
    assert turns[1].prompt_len == turns[0].new_prompt_len + 10 + turns[1].new_prompt_len
    share = sessions[3]
    assert [t.prompt for t in share] == ["what is a cat", "and a dog"]
    assert share[0].output_len == W.count("a small domesticated carnivorous mammal with soft fur")


def test_json_array_and_truncation(tmp_path: Path) -> None:
    p = tmp_path / "dump.json"
    p.write_text(json.dumps([{"prompt": f"p{i}"} for i in range(5)] + [{"turns": ["a", "b", "c"]}]))
    assert len(load_jsonl(p, 3, 16, W)) == 3
    specs = load_jsonl(p, 7, 16, W)
    assert len(specs) == 7 and specs[-1].turn == 1  # the last session is cut short


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "ok"}\n{"prompt": \n', r"work\.jsonl:2: invalid JSON"),
        ('{"prompt": "ok"}\n[1, 2]\n', r"work\.jsonl:2: expected a JSON object"),
        ('{"text": "no known key"}\n', r"work\.jsonl:1: object needs one of the keys"),
        ('{"prompt": "x", "output_len": 0}\n', r":1: output_len must be a positive integer"),
        ('{"prompt": "x", "output_len": [3]}\n', r"takes one output_len"),
        ('{"messages": [{"role": "user"}]}\n', r"messages must be a non-empty list"),
        ('{"turns": ["a", "b"], "output_len": [1]}\n', r"1 output lengths for 2 turns"),
        ('{"turns": []}\n', r"turns must be a non-empty list"),
        ('{"turns": ["a"], "think_time_s": -1}\n', r"think_time_s must be a number"),
        ('{"conversations": [{"from": "gpt", "value": "hi"}]}\n', r"no human turn followed by a reply"),
        ("\n\n", r"no requests in file"),
        ("[{]", r"invalid JSON array"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, match: str) -> None:
    with pytest.raises(JsonlError, match=match):
        load_jsonl(write(tmp_path, raw=content), 10, 16, W)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JsonlError, match="cannot read workload file"):
        load_jsonl(tmp_path / "absent.jsonl", 10, 16, W)

"""`drift bench offline` on a tiny model: the figures, the JSON, and the busy-machine warning."""

from __future__ import annotations

import json
from pathlib import Path

from drift_agent.cli import main
from tests.tiny_models import tiny_model_dir


def _offline(model: str, *extra: str) -> list[str]:
    return ["bench", "offline", "--model", model, "--num-prompts", "4", "--input-len", "4", "8",
            "--output-len", "2", "4", "--num-kv-blocks", "64", *extra]  # fmt: skip


def test_offline_compares_and_warns_when_the_machine_was_busy(tmp_path: Path, monkeypatch, capsys) -> None:
    from drift_agent.bench import machine

    monkeypatch.setattr(machine, "load_average", lambda: 1000.0)
    out = tmp_path / "offline.json"
    assert (
        main(_offline(str(tiny_model_dir("llama")), "--hf-batch-size", "2", "--save-result", str(out))) == 0
    )
    captured = capsys.readouterr()
    assert "ratio (drift / transformers, output tok/s)" in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("drift bench offline: warning: the machine was busy")
    assert "so the ratio cannot be trusted" in warning[0]
    doc = json.loads(out.read_text())
    assert doc["ratio_output_tokens_per_s"] > 0 and doc["machine"]["busy"] is True


def test_offline_on_an_idle_machine_prints_no_warning(monkeypatch, capsys) -> None:
    from drift_agent.bench import machine

    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    monkeypatch.setattr(machine, "read_cpu_times", lambda: None)
    assert main(_offline(str(tiny_model_dir("llama")), "--skip-transformers")) == 0
    captured = capsys.readouterr()
    assert "drift        :" in captured.out and "warning" not in captured.err


def test_offline_refuses_a_context_window_above_the_models(capsys) -> None:
    assert main(_offline(str(tiny_model_dir("llama")), "--max-model-len", "100000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drift bench offline: error: max_model_len 100000 exceeds") and "\n" not in err

"""`drift profile` on a tiny model: measures, fits, saves a profile the engine then loads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from drift_agent.cli import main
from drift_agent.core.config import EngineConfig
from drift_agent.engine.llm_engine import LLMEngine
from tests.tiny_models import tiny_model_dir


def test_profile_then_engine_uses_it(tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "p.json"
    plot = tmp_path / "p.png"
    assert main(["profile", "--model", model, "--quick", "--output", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "fit error" in printed and "MAPE" in printed
    data = json.loads(out.read_text())
    assert data and plot.stat().st_size > 0
    eng = LLMEngine(EngineConfig(model=model, policy="drift", profile_path=str(out), num_kv_blocks=64))
    assert type(eng._mux_context().perf_model).__name__ == "FittedPerfModel"


def test_profile_rejects_bad_arguments(capsys):
    assert main(["profile", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["profile", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama_profile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "p.json"
    model = str(tiny_model_dir("llama"))
    assert main(["profile", "--model", model, "--quick", "--no-contention", "--output", str(out)]) == 0
    return out


def test_a_renamed_or_moved_model_keeps_its_profile(llama_profile, tmp_path) -> None:
    (prof,) = json.loads(llama_profile.read_text())["profiles"]
    assert prof["model"] == "LlamaForCausalLM:L2-H64-A4-KV2-D16-I128-V512"  # identity, not the path
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir("llama"), moved)
    eng = LLMEngine(
        EngineConfig(
            model=str(moved),
            served_model_name="renamed",
            policy="drift",
            profile_path=str(llama_profile),
            num_kv_blocks=64,
        )
    )
    assert type(eng._mux_context().perf_model).__name__ == "FittedPerfModel"


def test_a_profile_of_another_model_is_a_warning(llama_profile, caplog) -> None:
    config = EngineConfig(
        model=str(tiny_model_dir("qwen3")), policy="drift", profile_path=str(llama_profile), num_kv_blocks=64
    )
    eng = LLMEngine(config)
    with caplog.at_level(logging.WARNING, logger="drift_agent.multiplex.model_select"):
        assert type(eng._mux_context().perf_model).__name__ == "AnalyticPerfModel"
    (record,) = [r for r in caplog.records if r.name == "drift_agent.multiplex.model_select"]
    assert record.levelno == logging.WARNING
    assert str(llama_profile) in record.getMessage() and "no profile for" in record.getMessage()

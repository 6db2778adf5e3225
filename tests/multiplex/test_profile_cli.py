"""`drift profile` on a tiny model: measures, fits, saves a profile the engine then loads."""

from __future__ import annotations

import json

from drift_agent.cli import main
from drift_agent.engine.config import EngineConfig
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

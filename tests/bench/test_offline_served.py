"""`drift bench offline --served`: the same work through the engine alone and through a real `drift serve`
subprocess (HTTP streaming), both figures and their ratio from one run."""

from __future__ import annotations

import json
from pathlib import Path

from drift_agent.cli import main
from tests.tiny_models import tiny_model_dir


def test_served_prints_engine_and_served_throughput_and_their_ratio(tmp_path: Path, capsys) -> None:
    out = tmp_path / "served.json"
    argv = ["bench", "offline", "--served", "--model", str(tiny_model_dir("llama")), "--num-prompts", "4",
            "--input-len", "4", "8", "--output-len", "2", "6", "--num-kv-blocks", "64", "--num-threads", "1",
            "--save-result", str(out)]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    engine = next(line for line in lines if line.startswith("drift        :"))
    served = next(line for line in lines if line.startswith("served (HTTP):"))
    ratio = next(line for line in lines if line.startswith("ratio (served / engine, output tok/s):"))
    assert "output tok/s" in engine and "output tok/s" in served and "event loop" in served
    assert float(ratio.rsplit(":", 1)[1]) > 0
    assert not any(line.startswith("transformers") for line in lines)
    doc = json.loads(out.read_text())
    # Exactly the requested tokens both ways: the server's usage agrees with the engine's count.
    assert doc["served"]["output_tokens"] == doc["drift"]["output_tokens"] > 0
    assert (
        doc["ratio_served_to_engine"]
        == doc["served"]["output_tokens_per_s"] / doc["drift"]["output_tokens_per_s"]
    )
    assert doc["served"]["server_cpu_s"] > 0

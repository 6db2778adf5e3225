"""Loader errors and loading rules on tiny checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drift_agent.core.errors import ModelLoadError
from drift_agent.models.llama import build_model
from drift_agent.models.loader import load_config, load_model, load_tokenizer
from tests.tiny_models import EOS_TOKEN, tiny_model_dir


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the tiny Llama checkpoint."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama"))


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", "float32", "cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, "float32", "cpu")


def test_unreadable_config(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_model(model_copy, "float32", "cpu")


def test_unsupported_architecture(model_copy: Path) -> None:
    _edit_config(model_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(model_copy, "float32", "cpu")


def test_no_weight_files(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_model(model_copy, "float32", "cpu")


def test_missing_and_unexpected_weights(model_copy: Path) -> None:
    state = load_file(str(model_copy / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        load_model(model_copy, "float32", "cpu")
    assert "missing weights [model.layers.1.mlp.down_proj.weight]" in str(info.value)
    assert "unexpected weights [model.layers.1.mlp.extra.weight]" in str(info.value)


def test_shape_mismatch(model_copy: Path) -> None:
    _edit_config(model_copy, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_model(model_copy, "float32", "cpu")


def test_sharded_checkpoint_loads(model_copy: Path) -> None:
    reference, _ = load_model(model_copy, "float32", "cpu")
    state = load_file(str(model_copy / "model.safetensors"))
    names = sorted(state)
    (model_copy / "model.safetensors").unlink()
    save_file({n: state[n] for n in names[::2]}, str(model_copy / "model-00001-of-00002.safetensors"))
    save_file({n: state[n] for n in names[1::2]}, str(model_copy / "model-00002-of-00002.safetensors"))
    sharded, _ = load_model(model_copy, "float32", "cpu")
    for (name, a), (_, b) in zip(reference.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_resolution(model_copy: Path) -> None:
    auto, _ = load_model(model_copy, "auto", "cpu")
    assert auto.model.embed_tokens.weight.dtype == torch.float32  # auto = fp32 on CPU
    half, _ = load_model(model_copy, torch.bfloat16, "cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(model_copy, "int8", "cpu")


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused(model_copy: Path, rope_type: str) -> None:
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=128)
    _edit_config(model_copy, rope_parameters=rope)
    with pytest.raises(ModelLoadError, match=f"unsupported RoPE scaling '{rope_type}'"):
        load_model(model_copy, "float32", "cpu")


def test_build_model_with_random_init_runs() -> None:
    config = load_config(tiny_model_dir("mistral"))
    model = build_model(config, "float32", "cpu", init_weights=True)
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tokenizer_round_trip_and_chat_template() -> None:
    tok = load_tokenizer(tiny_model_dir("qwen3"))
    text = "The café in 日本語 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == EOS_TOKEN and tok.pad_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)

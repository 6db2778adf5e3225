"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into Drift's model, and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from drift_agent.engine.errors import ModelLoadError
from drift_agent.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, build_model

# Checkpoint entries that are derived buffers, not weights (old Llama exports carry rotary inv_freq).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = ["build_model", "load_config", "load_model", "load_tokenizer", "load_weights"]


def _check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return path


def load_config(model_dir: str | Path) -> Any:
    """Read config.json via AutoConfig and check the architecture is one this engine implements."""
    path = _check_dir(model_dir)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for bad configs
        raise ModelLoadError(f"{path}: cannot parse config.json ({exc})") from exc


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (found {', '.join(found)}; only safetensors are supported)" if found else ""
        raise ModelLoadError(f"{path}: no *.safetensors weight files{hint}")
    return files


def load_weights(model: LlamaForCausalLM, model_dir: str | Path) -> None:
    """Copy every tensor of the directory's safetensors shards to where the model keeps it (by HF name; fused
    projections take their slice, transposed)."""
    from safetensors import SafetensorError, safe_open

    path = Path(model_dir)
    targets = model.checkpoint_targets()
    tied_head = model.tie_word_embeddings
    device = next(iter(targets.values())).dest.device
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for file in _weight_files(path):
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        if name.endswith(_IGNORED_SUFFIXES) or (tied_head and name == "lm_head.weight"):
                            continue
                        target = targets.get(name)
                        if target is None:
                            unexpected.append(name)
                            continue
                        tensor = f.get_tensor(name)
                        if tuple(tensor.shape) != target.shape:
                            raise ModelLoadError(
                                f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                f"the config implies {target.shape}"
                            )
                        tensor = tensor.t() if target.transposed else tensor
                        target.dest.copy_(tensor.to(device=device, dtype=target.dest.dtype))
                        loaded.add(name)
            except SafetensorError as exc:
                raise ModelLoadError(f"{file}: unreadable safetensors file ({exc})") from exc
    missing = sorted(set(targets) - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected weights {_preview(sorted(unexpected))}")
        raise ModelLoadError(f"{path}: checkpoint does not match the config: " + "; ".join(parts))


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
) -> tuple[LlamaForCausalLM, Any]:
    """Build the model for `model_dir` and load its weights; returns (model in eval mode, HF config)."""
    config = load_config(model_dir)
    model = build_model(config, dtype, device, attention_backend=attention_backend)
    load_weights(model, model_dir)
    model.tie_weights()
    model.enable_onednn()
    return model, config


def load_tokenizer(model_dir: str | Path) -> Any:
    path = _check_dir(model_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # missing/corrupt tokenizer files surface as many exception types
        raise ModelLoadError(f"{path}: cannot load tokenizer ({exc})") from exc

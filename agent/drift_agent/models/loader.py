"""Load a Hugging Face checkpoint directory (config.json + *.safetensors) into Drift's model, and its tokenizer."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from drift_agent.core.errors import DriftError, ModelLoadError
from drift_agent.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, build_model

# Checkpoint entries that are derived buffers, not weights (old Llama exports carry rotary inv_freq).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = [
    "GENERATION_DEFAULT_KEYS",
    "MaxModelLenError",
    "build_model",
    "load_config",
    "load_generation_defaults",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "model_max_len",
    "read_config",
    "resolve_max_model_len",
    "resolve_model_path",
]

# What the engine assumes when a config states no max_position_embeddings.
DEFAULT_MAX_POSITION_EMBEDDINGS = 4096
# RoPE scalings that stretch the trained window by `factor` (vLLM derives the limit the same way); llama3
# configs already state the stretched length in max_position_embeddings.
_STRETCHING_ROPE_TYPES = ("linear", "yarn")


class MaxModelLenError(DriftError, ValueError):
    """The requested context window exceeds what the model supports (refused, as vLLM does, not clamped)."""


# A Hugging Face id: `name` or `org/name` (letters, digits, `-_.`), never an absolute or relative path.
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

# generation_config.json keys that become request defaults, as vLLM reads them (max_new_tokens: max_tokens).
GENERATION_DEFAULT_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def resolve_model_path(name: str, what: str = "model") -> Path:
    """A local directory as is; otherwise a Hugging Face id resolved in the local Hugging Face cache
    (HF_HUB_CACHE / HF_HOME), as vLLM loads it, but never downloaded: a server must not fetch gigabytes
    at start-up behind the operator's back. Raises `ModelLoadError` with one line when neither fits."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{what} {name!r} is a file, not a Hugging Face model directory")
    if name.startswith((".", "/", "~")) or not _HF_ID.fullmatch(name):
        raise ModelLoadError(f"{what} directory {str(path)!r} does not exist or is not a directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ModelLoadError(f"{what} {name!r} is not a local directory (huggingface_hub missing)") from None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or a cache entry without a snapshot
        raise ModelLoadError(
            f"{what} {name!r} is neither a local directory nor in the Hugging Face cache ({HF_HUB_CACHE}); "
            f"Drift never downloads: fetch it first (hf download {name}) or pass a directory"
        ) from None


def load_generation_defaults(source: str, model_dir: str | Path) -> dict[str, Any]:
    """The request defaults of `--generation-config` (vLLM's flag): `vllm`, none; `auto`, the model
    directory's generation_config.json (none if it has no such file); else that directory's file, which
    must exist. Only the keys vLLM takes (GENERATION_DEFAULT_KEYS), under the request's names."""
    if source == "vllm":
        return {}
    if source == "auto":
        file = Path(model_dir) / "generation_config.json"
        if not file.is_file():
            return {}
    else:
        folder = Path(source).expanduser()
        file = folder / "generation_config.json"
        if not file.is_file():
            raise ModelLoadError(
                f"--generation-config {source!r}: no generation_config.json there "
                "(give auto, vllm, or a directory holding one)"
            )
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file}: not a JSON object")
    return {ours: raw[key] for key, ours in GENERATION_DEFAULT_KEYS.items() if raw.get(key) is not None}


def _check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return path


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as a dict, after checking the directory and that the architecture is one this engine
    implements; cheap (no transformers import), so commands check a model before loading it."""
    path = _check_dir(model_dir)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path / 'config.json'}: not a JSON object")
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return raw


def _max_len_and_source(config: Mapping[str, Any] | Any) -> tuple[int, str]:
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    base = int(get("max_position_embeddings") or DEFAULT_MAX_POSITION_EMBEDDINGS)
    source = f"max_position_embeddings {base}"
    rope = get("rope_parameters") or get("rope_scaling")  # transformers 5 / 4 spelling
    rope = dict(rope) if isinstance(rope, Mapping) else {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    if rope_type in _STRETCHING_ROPE_TYPES and isinstance(factor, (int, float)) and factor > 1:
        if rope_type == "yarn" and rope.get("original_max_position_embeddings"):
            base = int(rope["original_max_position_embeddings"])
            source = f"original_max_position_embeddings {base}"
        return int(base * factor), f"{source} x {rope_type} RoPE factor {factor:g}"
    return base, source


def model_max_len(config: Mapping[str, Any] | Any) -> int:
    """The longest context (tokens) the model supports, from its config (a dict or a `PretrainedConfig`):
    max_position_embeddings, stretched by a linear or YaRN RoPE scaling factor."""
    return _max_len_and_source(config)[0]


def resolve_max_model_len(config: Mapping[str, Any] | Any, requested: int | None) -> int:
    """The context window to run with: `requested`, or the model's limit when None. A request above the
    limit raises `MaxModelLenError`: positions past it were never trained, so clamping would hide a typo."""
    limit, source = _max_len_and_source(config)
    if requested is None:
        return limit
    if requested > limit:
        raise MaxModelLenError(
            f"max_model_len {requested} exceeds the model's maximum context length {limit} ({source} in "
            f"config.json); pass at most {limit}, or leave it unset to use {limit}"
        )
    return requested


def load_config(model_dir: str | Path) -> Any:
    """Read config.json via AutoConfig and check the architecture is one this engine implements."""
    path = _check_dir(model_dir)
    read_config(path)
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
    """The tokenizer of a model directory, or of a directory holding only tokenizer files (`--tokenizer`,
    as vLLM accepts)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
    if not any(
        (path / name).is_file() for name in ("config.json", "tokenizer_config.json", "tokenizer.json")
    ):
        raise ModelLoadError(f"{path}: no tokenizer_config.json, tokenizer.json or config.json")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # missing/corrupt tokenizer files surface as many exception types
        raise ModelLoadError(f"{path}: cannot load tokenizer ({exc})") from exc

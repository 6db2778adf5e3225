"""Choose the performance model for an engine: the measured profile when one matches, else the roofline.

A profile is found by what the model *is* (its architecture and shape: `model_identity`), the device and the
dtype, never by `--served-model-name` or the directory it was loaded from: step latencies depend on the
former only, so a renamed or moved model keeps its profile. Profiles written before identity keys (keyed by
the served name) are still found by that name when the layer count agrees. A profile path that yields no match
is logged at WARNING: the operator asked for measured latencies and is getting the roofline's estimates.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .analytic import AnalyticPerfModel, ModelShape
from .devices import DeviceSpec
from .perf_model import FittedPerfModel, PerfModel
from .schema import PerfProfile, ProfileError, read_profile_file

log = logging.getLogger(__name__)


def shape_signature(shape: ModelShape) -> str:
    """The dimensions step latencies depend on, e.g. `L30-H576-A9-KV3-D64-I1536-V49152`."""
    return (
        f"L{shape.num_layers}-H{shape.hidden_size}-A{shape.num_heads}-KV{shape.num_kv_heads}"
        f"-D{shape.head_dim}-I{shape.intermediate_size}-V{shape.vocab_size}"
    )


def model_identity(shape: ModelShape, architecture: str | None = None) -> str:
    """The profile key of a model: `LlamaForCausalLM:L30-H576-...`, or the shape alone without an
    architecture. `drift profile` writes it; `select_perf_model` looks it up."""
    sig = shape_signature(shape)
    return f"{architecture}:{sig}" if architecture else sig


def identity_matches(key: str, shape: ModelShape, architecture: str | None = None) -> bool:
    """Whether a profile's model key is this model's identity. Either side may lack the architecture (an
    older caller, a hand-written key); the shape must always agree."""
    arch, _, sig = key.rpartition(":")
    if sig != shape_signature(shape):
        return False
    return not arch or architecture is None or arch == architecture


def _find(
    profiles: list[PerfProfile],
    *,
    model: str,
    architecture: str | None,
    device_name: str,
    dtype: str,
    shape: ModelShape,
) -> PerfProfile | None:
    here = [p for p in profiles if p.device == device_name and p.dtype == dtype]
    by_identity = [p for p in here if identity_matches(p.model, shape, architecture)]
    if by_identity:
        # Several can only differ in how the key spells the architecture; prefer the most specific.
        return max(by_identity, key=lambda p: ":" in p.model)
    by_name = [p for p in here if p.model == model and p.num_layers == shape.num_layers]
    return by_name[0] if len(by_name) == 1 else None


def select_perf_model(
    *,
    profile_path: str | Path | None,
    model: str,
    device_name: str,
    dtype: str,
    shape: ModelShape,
    device: DeviceSpec,
    strict: bool = False,
    architecture: str | None = None,
) -> tuple[PerfModel, str]:
    """(model, one-line reason). `model` is the served name, used only for legacy name-keyed profiles and in
    messages; `architecture` (the config's `architectures[0]`) narrows the identity when given. A missing or
    non-matching profile falls back to the analytic model with a WARNING unless `strict`, in which case the
    `ProfileError` propagates (e.g. the operator passed --profile explicitly)."""
    if profile_path is None:
        return AnalyticPerfModel(shape, device), f"analytic roofline model (no profile for {device.name})"
    identity = model_identity(shape, architecture)
    try:
        file = read_profile_file(profile_path)
        prof = _find(
            file.profiles,
            model=model,
            architecture=architecture,
            device_name=device_name,
            dtype=dtype,
            shape=shape,
        )
        if prof is None:
            available = ", ".join("/".join(p.key) for p in file.profiles) or "none"
            raise ProfileError(
                f"{profile_path}: no profile for {model}/{device_name}/{dtype} "
                f"(model identity {identity}; available: {available})"
            )
        if prof.num_layers != shape.num_layers:
            raise ProfileError(
                f"{profile_path}: profile has {prof.num_layers} layers, the model has {shape.num_layers}"
            )
    except ProfileError as e:
        if strict:
            raise
        log.warning("performance profile not used, falling back to the analytic roofline model: %s", e)
        return AnalyticPerfModel(shape, device), f"analytic roofline model ({e})"
    return FittedPerfModel(prof), f"profile {profile_path} ({prof.model}/{device_name}/{dtype})"

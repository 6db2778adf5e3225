"""Choose the performance model for an engine: the measured profile when one matches, else the roofline."""

from __future__ import annotations

from pathlib import Path

from .analytic import AnalyticPerfModel, ModelShape
from .devices import DeviceSpec
from .perf_model import FittedPerfModel, PerfModel
from .schema import ProfileError, load_profile


def select_perf_model(
    *,
    profile_path: str | Path | None,
    model: str,
    device_name: str,
    dtype: str,
    shape: ModelShape,
    device: DeviceSpec,
    strict: bool = False,
) -> tuple[PerfModel, str]:
    """(model, one-line reason). A missing or non-matching profile falls back to the analytic model unless
    `strict`, in which case the `ProfileError` propagates (e.g. the operator passed --profile explicitly)."""
    if profile_path is not None:
        try:
            prof = load_profile(profile_path, model=model, device=device_name, dtype=dtype)
            if prof.num_layers != shape.num_layers:
                raise ProfileError(
                    f"{profile_path}: profile has {prof.num_layers} layers, the model has {shape.num_layers}"
                )
            return FittedPerfModel(prof), f"profile {profile_path} ({model}/{device_name}/{dtype})"
        except ProfileError as e:
            if strict:
                raise
            return AnalyticPerfModel(shape, device), f"analytic roofline model ({e})"
    return AnalyticPerfModel(shape, device), f"analytic roofline model (no profile for {device.name})"

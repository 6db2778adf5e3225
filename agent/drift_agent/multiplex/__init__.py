"""PD multiplexing: the contention-aware performance model, the SLO-aware dispatcher and profiling.

Pure logic (no tensors, no device): the engine's `drift` policy and multiplexed executor wire it to real
forward passes and to a `drift_agent.partition.Partitioner`. See README.md in this folder for the design.
"""

from __future__ import annotations

from .analytic import AnalyticPerfModel, ModelShape, bandwidth_share
from .devices import KNOWN_DEVICES, DeviceSpec, cpu_device_spec, lookup_device
from .dispatcher import (
    DecodeLoad,
    DecodeRequest,
    DispatchDecision,
    Dispatcher,
    DispatcherConfig,
    DispatchState,
    InFlightPrefill,
    PrefillAction,
    PrefillRequest,
)
from .fitting import ContentionSample, fit_contention, fit_decode_grid, fit_prefill_grid, fit_profile
from .model_select import select_perf_model
from .perf_model import FittedPerfModel, PerfModel, PrefillShape
from .schema import (
    SCHEMA_VERSION,
    Contention,
    DecodeSample,
    PerfProfile,
    PrefillSample,
    ProfileError,
    load_profile,
    read_profile_file,
    save_profile,
)

__all__ = [
    "KNOWN_DEVICES",
    "SCHEMA_VERSION",
    "AnalyticPerfModel",
    "Contention",
    "ContentionSample",
    "DecodeLoad",
    "DecodeRequest",
    "DecodeSample",
    "DeviceSpec",
    "DispatchDecision",
    "DispatchState",
    "Dispatcher",
    "DispatcherConfig",
    "FittedPerfModel",
    "InFlightPrefill",
    "ModelShape",
    "PerfModel",
    "PerfProfile",
    "PrefillAction",
    "PrefillRequest",
    "PrefillSample",
    "PrefillShape",
    "ProfileError",
    "bandwidth_share",
    "cpu_device_spec",
    "fit_contention",
    "fit_decode_grid",
    "fit_prefill_grid",
    "fit_profile",
    "load_profile",
    "lookup_device",
    "read_profile_file",
    "save_profile",
    "select_perf_model",
]

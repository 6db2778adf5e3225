"""`drift sim`: a discrete-event simulator of Drift instances and clusters on a virtual clock.

The engine's own scheduler, block manager and policies decide every step; a performance model (a measured
profile or the analytic roofline of a preset model/GPU) supplies step latencies. Workloads, arrival times,
metrics, sweeps and plots are the benchmark's (`drift_agent.bench`), so simulated and measured results overlay.
"""

from __future__ import annotations

from .cluster import Cluster, ClusterConfig, SimulationError
from .instance import InstanceConfig, SimInstance
from .migration import MigrationConfig
from .requests import SimRun
from .runner import LoadSpec, RatePoint, SimSetup, result_document, simulate_rate, simulate_sweep

__all__ = [
    "Cluster",
    "ClusterConfig",
    "InstanceConfig",
    "LoadSpec",
    "MigrationConfig",
    "RatePoint",
    "SimInstance",
    "SimRun",
    "SimSetup",
    "SimulationError",
    "result_document",
    "simulate_rate",
    "simulate_sweep",
]

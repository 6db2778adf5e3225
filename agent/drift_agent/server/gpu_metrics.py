"""GPU gauges read with NVML (pynvml) at scrape time. Without a GPU or driver the collector yields nothing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [(str(i), pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no device: GPU metrics are simply absent
            log.debug("GPU metrics disabled: %s", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def describe(self) -> list:
        # Describing nothing keeps registration free of NVML calls; the families appear only when collected.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self._handles:
            return
        nv = self._nvml
        util = GaugeMetricFamily(
            "drift_gpu_utilization_ratio", "GPU busy fraction (NVML, 0..1)", labels=["gpu"]
        )
        used = GaugeMetricFamily("drift_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        total = GaugeMetricFamily(
            "drift_gpu_memory_total_bytes", "GPU memory in total (NVML)", labels=["gpu"]
        )
        power = GaugeMetricFamily("drift_gpu_power_watts", "GPU power draw (NVML)", labels=["gpu"])
        for index, handle in self._handles:
            # Each reading on its own: a device without power sensing still reports the others.
            with contextlib.suppress(Exception):
                util.add_metric([index], nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            with contextlib.suppress(Exception):
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([index], float(mem.used))
                total.add_metric([index], float(mem.total))
            with contextlib.suppress(Exception):
                power.add_metric([index], nv.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        for family in (util, used, total, power):
            if family.samples:
                yield family

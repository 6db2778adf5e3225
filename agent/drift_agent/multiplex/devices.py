"""Peak figures of known accelerators, for the analytic (roofline) performance model.

Figures are vendor datasheet numbers: dense (no 2:4 sparsity) BF16 tensor-core FLOP/s, HBM/GDDR bandwidth, and
the host link (PCIe x16, one direction: the datasheets quote both directions together, Gen5 128 GB/s and Gen4
64 GB/s). Real kernels and DMA reach a fraction of them; the analytic model and the simulator's KV copies apply
efficiency factors on top.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# PCIe x16, nominal bytes/s per direction: NVIDIA's datasheets quote "PCIe Gen5 128 GB/s" and "PCIe Gen4
# 64 GB/s" for both directions together (Gen5: 32 GT/s x 16 lanes, about 63 GB/s after 128b/130b encoding).
PCIE5_X16 = 64e9
PCIE4_X16 = 32e9


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    sms: int  # streaming multiprocessors (CPU: cores, a nominal unit of compute)
    peak_flops: float  # dense BF16 FLOP/s
    mem_bw: float  # bytes/s
    source: str = ""
    # Host <-> device link, bytes/s one way (KV swap and host-tier copies); PCIe Gen4 x16 unless known.
    host_bw: float = PCIE4_X16

    def __post_init__(self) -> None:
        if self.sms <= 0 or self.peak_flops <= 0 or self.mem_bw <= 0 or self.host_bw <= 0:
            raise ValueError(f"device spec {self.name!r} needs positive sms, peak_flops, mem_bw and host_bw")


_T = 1e12
# Ordered: the first entry whose every token is a word of the device name wins, so specific names come first.
KNOWN_DEVICES: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    # Host links (same datasheets): H200 and H100 (SXM, PCIe) PCIe Gen5 x16; A100, L40S, L40, L4 and the
    # RTX 4090 PCIe Gen4 x16.
    # NVIDIA H200 datasheet: 989 TFLOP/s BF16 dense (1979 sparse), 4.8 TB/s HBM3e; GH100 with 132 SMs.
    (("h200",), DeviceSpec("NVIDIA H200", 132, 989 * _T, 4.8 * _T, "NVIDIA H200 datasheet", PCIE5_X16)),
    # NVIDIA H100 datasheet: PCIe 756 TFLOP/s BF16 dense, 2.0 TB/s HBM2e, 114 SMs.
    (
        ("h100", "pcie"),
        DeviceSpec("NVIDIA H100 PCIe", 114, 756 * _T, 2.0 * _T, "NVIDIA H100 datasheet", PCIE5_X16),
    ),
    # NVIDIA H100 datasheet: SXM5 989 TFLOP/s BF16 dense, 3.35 TB/s HBM3, 132 SMs (whitepaper).
    (
        ("h100",),
        DeviceSpec(
            "NVIDIA H100 SXM", 132, 989 * _T, 3.35 * _T, "NVIDIA H100 datasheet/whitepaper", PCIE5_X16
        ),
    ),
    # NVIDIA A100 datasheet: 312 TFLOP/s BF16 dense; 80GB SXM 2.039 TB/s, 80GB PCIe 1.935 TB/s, 40GB 1.555 TB/s.
    (
        ("a100", "80gb", "pcie"),
        DeviceSpec("NVIDIA A100 80GB PCIe", 108, 312 * _T, 1.935 * _T, "A100 datasheet", PCIE4_X16),
    ),
    (
        ("a100", "80gb"),
        DeviceSpec("NVIDIA A100 80GB SXM", 108, 312 * _T, 2.039 * _T, "A100 datasheet", PCIE4_X16),
    ),
    (("a100",), DeviceSpec("NVIDIA A100 40GB", 108, 312 * _T, 1.555 * _T, "A100 datasheet", PCIE4_X16)),
    # NVIDIA L40S datasheet: 362 TFLOP/s BF16 dense (733 sparse), 864 GB/s GDDR6, 142 SMs.
    (("l40s",), DeviceSpec("NVIDIA L40S", 142, 362 * _T, 0.864 * _T, "NVIDIA L40S datasheet", PCIE4_X16)),
    # NVIDIA L40 datasheet: 181 TFLOP/s BF16 dense, 864 GB/s, 142 SMs.
    (("l40",), DeviceSpec("NVIDIA L40", 142, 181 * _T, 0.864 * _T, "NVIDIA L40 datasheet", PCIE4_X16)),
    # NVIDIA L4 datasheet: 121 TFLOP/s BF16 dense (242 sparse), 300 GB/s, 58 SMs.
    (("l4",), DeviceSpec("NVIDIA L4", 58, 121 * _T, 0.300 * _T, "NVIDIA L4 datasheet", PCIE4_X16)),
    # Ada whitepaper: RTX 4090 165 TFLOP/s FP16/BF16 tensor (FP32 accumulate, dense), 1008 GB/s, 128 SMs.
    (
        ("4090",),
        DeviceSpec("NVIDIA GeForce RTX 4090", 128, 165 * _T, 1.008 * _T, "NVIDIA Ada whitepaper", PCIE4_X16),
    ),
)


def lookup_device(name: str) -> DeviceSpec | None:
    """The known spec for a device name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for tokens, spec in KNOWN_DEVICES:
        if all(t in words for t in tokens):
            return spec
    return None


def cpu_device_spec(
    flops: float | None = None, mem_bw: float | None = None, cores: int | None = None
) -> DeviceSpec:
    """A CPU as a "device": cores play the role of SMs. FLOP/s should come from a measurement
    (`measure_cpu_flops`) or configuration; the defaults are deliberately modest (50 GFLOP/s per core,
    20 GB/s) so an unmeasured CPU is never predicted faster than it is. Its "host link" is a memory-to-memory
    copy by one thread (the engine's copy worker): about 10 GB/s."""
    n = cores or os.cpu_count() or 1
    return DeviceSpec(
        name="cpu",
        sms=n,
        peak_flops=flops if flops is not None else 50e9 * n,
        mem_bw=mem_bw if mem_bw is not None else 20e9,
        source="measured" if flops is not None else "conservative default",
        host_bw=10e9,
    )


def measure_cpu_flops(size: int = 512, repeats: int = 5) -> float:
    """Best-of-N float32 matmul throughput of this CPU (reads the clock; call it from setup code, not the
    dispatcher)."""
    import time

    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / max(best, 1e-9)

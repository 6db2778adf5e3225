"""Built-in hardware presets for the simulator: model shapes, GPU memory, tensor parallelism, SM splits.

Model shapes are the `config.json` figures of the Hugging Face checkpoints named in each entry (hidden_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size; head_dim =
hidden/heads for all of them). Device compute and bandwidth come from `multiplex.devices` (datasheets); the
memory sizes below are from the same datasheets.

Tensor parallelism (TP=k GPUs per instance) is modelled as one device with k times the FLOP/s and HBM bandwidth
(weights and KV are sharded k ways) and the per-GPU SM count (a split applies to every GPU of the group alike),
plus two all-reduces per layer: a fixed latency each and a ring all-reduce of the layer's activations over the
GPU interconnect, 2(k-1)/k · tokens · hidden · bytes / link bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..multiplex.analytic import AnalyticPerfModel, ModelShape
from ..multiplex.devices import DeviceSpec, lookup_device
from ..multiplex.perf_model import PerfModel, PrefillShape
from ..partition.base import Split
from ..partition.splits import candidate_splits


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hf_id: str
    shape: ModelShape


def _shape(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int) -> ModelShape:
    return ModelShape(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=vocab,
    )


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # meta-llama/Llama-2-7b-hf config.json: 32 layers, hidden 4096, 32 heads (MHA), MLP 11008, vocab 32000.
        ModelPreset("llama-2-7b", "meta-llama/Llama-2-7b-hf", _shape(32, 4096, 32, 32, 11008, 32000)),
        # meta-llama/Llama-2-13b-hf: 40 layers, hidden 5120, 40 heads (MHA), MLP 13824, vocab 32000.
        ModelPreset("llama-2-13b", "meta-llama/Llama-2-13b-hf", _shape(40, 5120, 40, 40, 13824, 32000)),
        # meta-llama/Meta-Llama-3-8B (and 3.1-8B): 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336,
        # vocab 128256.
        ModelPreset("llama-3-8b", "meta-llama/Meta-Llama-3-8B", _shape(32, 4096, 32, 8, 14336, 128256)),
        # meta-llama/Meta-Llama-3-70B (and 3.1-70B): 80 layers, hidden 8192, 64 heads, 8 KV heads, MLP 28672.
        ModelPreset("llama-3-70b", "meta-llama/Meta-Llama-3-70B", _shape(80, 8192, 64, 8, 28672, 128256)),
        # codellama/CodeLlama-34b-hf (the LMSYS PD-multiplexing blog's model): 48 layers, hidden 8192,
        # 64 heads, 8 KV heads, MLP 22016, vocab 32000.
        ModelPreset("codellama-34b", "codellama/CodeLlama-34b-hf", _shape(48, 8192, 64, 8, 22016, 32000)),
        # Qwen/Qwen2.5-7B: 28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064.
        ModelPreset("qwen2.5-7b", "Qwen/Qwen2.5-7B", _shape(28, 3584, 28, 4, 18944, 152064)),
        # Qwen/Qwen2.5-14B: 48 layers, hidden 5120, 40 heads, 8 KV heads, MLP 13824, vocab 152064.
        ModelPreset("qwen2.5-14b", "Qwen/Qwen2.5-14B", _shape(48, 5120, 40, 8, 13824, 152064)),
        # Qwen/Qwen2.5-32B: 64 layers, hidden 5120, 40 heads, 8 KV heads, MLP 27648, vocab 152064.
        ModelPreset("qwen2.5-32b", "Qwen/Qwen2.5-32B", _shape(64, 5120, 40, 8, 27648, 152064)),
    )
}

# GPU memory (bytes) and inter-GPU link bandwidth (bytes/s, per direction) by device name, from the same
# datasheets as `multiplex.devices`: H100 SXM 80 GB + NVLink4 450 GB/s; H100 PCIe 80 GB + NVLink bridge 300 GB/s;
# H200 141 GB + 450 GB/s; A100 80/40 GB + NVLink3 300 GB/s (PCIe card: bridge 300 GB/s); L40S/L40 48 GB,
# L4 24 GB, RTX 4090 24 GB with PCIe Gen4 x16 (~32 GB/s) only.
_GB = 1e9
GPU_MEMORY: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (141 * _GB, 450 * _GB),
    "NVIDIA H100 PCIe": (80 * _GB, 300 * _GB),
    "NVIDIA H100 SXM": (80 * _GB, 450 * _GB),
    "NVIDIA A100 80GB PCIe": (80 * _GB, 300 * _GB),
    "NVIDIA A100 80GB SXM": (80 * _GB, 300 * _GB),
    "NVIDIA A100 40GB": (40 * _GB, 300 * _GB),
    "NVIDIA L40S": (48 * _GB, 32 * _GB),
    "NVIDIA L40": (48 * _GB, 32 * _GB),
    "NVIDIA L4": (24 * _GB, 32 * _GB),
    "NVIDIA GeForce RTX 4090": (24 * _GB, 32 * _GB),
}
# Green-context partition constraints (min SMs, alignment) by architecture: Hopper (CC 9.0) 8/8, Ampere and
# Ada (CC 8.x) 4/2 (see `partition.splits`).
_HOPPER = ("NVIDIA H200", "NVIDIA H100 PCIe", "NVIDIA H100 SXM")
ALLREDUCE_LATENCY_S = (
    8e-6  # one small NCCL all-reduce inside a node (order of magnitude of NCCL's LL protocol)
)


def model_preset(name: str) -> ModelPreset:
    key = name.lower()
    if key not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[key]


def device_preset(name: str) -> DeviceSpec:
    """A known GPU by a loose name ("h100", "a100-80gb", "NVIDIA H200")."""
    spec = lookup_device(name.replace("-", " ").replace("_", " "))
    if spec is None or spec.name not in GPU_MEMORY:
        known = ", ".join(sorted(GPU_MEMORY))
        raise ValueError(f"unknown device {name!r}; known: {known}")
    return spec


def split_constraints(device: DeviceSpec) -> tuple[int, int]:
    return (8, 8) if device.name in _HOPPER else (4, 2)


def device_splits(device: DeviceSpec, max_mixed: int = 6) -> list[Split]:
    """The (prefill, decode) SM splits an engine on this GPU pre-creates."""
    min_size, align = split_constraints(device)
    return candidate_splits(device.sms, min_size, align, max_mixed=max_mixed)


class TensorParallelPerfModel(AnalyticPerfModel):
    """The roofline model of a TP group: k GPUs' FLOP/s and bandwidth, plus per-layer all-reduces."""

    def __init__(self, shape: ModelShape, gpu: DeviceSpec, tp: int, link_bw: float) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
        group = DeviceSpec(
            name=gpu.name if tp == 1 else f"{tp}x {gpu.name}",
            sms=gpu.sms,
            peak_flops=gpu.peak_flops * tp,
            mem_bw=gpu.mem_bw * tp,
            source=gpu.source,
            host_bw=gpu.host_bw * tp,
        )
        extra = 2 * ALLREDUCE_LATENCY_S if tp > 1 else 0.0
        super().__init__(shape, group, overhead_per_layer_s=30e-6 + extra)
        self.tp = tp
        self.link_bw = link_bw
        # Seconds per token of one layer's two ring all-reduces (0 without TP).
        self._comm_per_token = (
            0.0
            if tp == 1
            else 2 * (2 * (tp - 1) / tp) * shape.hidden_size * shape.dtype_bytes / link_bw * shape.num_layers
        )

    def _prefill_base_with_rows(
        self, chunks: list[PrefillShape], rows: int, row_context: int, sms: int
    ) -> float:
        base = super()._prefill_base_with_rows(chunks, rows, row_context, sms)
        if not self._comm_per_token:
            return base
        return base + (sum(s.new_tokens for s in chunks) + rows) * self._comm_per_token

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        return super()._decode_base(batch_size, kv_tokens, sms) + batch_size * self._comm_per_token

    def _decode_base_many(self, batch_size: int, kv_tokens: np.ndarray, sms: int) -> np.ndarray:
        return super()._decode_base_many(batch_size, kv_tokens, sms) + batch_size * self._comm_per_token


@dataclass(frozen=True)
class Hardware:
    """One serving instance: a model on `tp` GPUs of one kind."""

    model: ModelPreset
    gpu: DeviceSpec
    tp: int = 1

    @property
    def memory_bytes(self) -> float:
        return GPU_MEMORY[self.gpu.name][0] * self.tp

    @property
    def link_bw(self) -> float:
        return GPU_MEMORY[self.gpu.name][1]

    @property
    def label(self) -> str:
        tp = f" TP{self.tp}" if self.tp > 1 else ""
        return f"{self.model.name} on {self.gpu.name}{tp}"

    def perf_model(self) -> PerfModel:
        return TensorParallelPerfModel(self.model.shape, self.gpu, self.tp, self.link_bw)

    def weight_storage_bytes(self) -> float:
        m = self.model.shape
        # Every layer, the LM head and the (untied) input embedding.
        return (m.num_layers * m.layer_params + 2 * m.vocab_size * m.hidden_size) * m.dtype_bytes

    def kv_blocks(
        self, block_size: int, max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9
    ) -> int:
        """KV blocks that fit beside the weights and one step's activations, as the engine sizes its pool."""
        m = self.model.shape
        activations = max_num_batched_tokens * (4 * m.hidden_size + 3 * m.intermediate_size) * m.dtype_bytes
        reserve = (activations / self.tp + 2**30) * self.tp  # per GPU: its activation shard plus 1 GiB
        free = self.memory_bytes * gpu_memory_utilization - self.weight_storage_bytes() - reserve
        blocks = math.floor(free / (m.kv_bytes_per_token * block_size))
        if blocks < 1:
            raise ValueError(
                f"{self.model.name} does not fit on {self.tp}x {self.gpu.name}: "
                f"{self.weight_storage_bytes() / 1e9:.0f} GB of weights vs {self.memory_bytes / 1e9:.0f} GB"
            )
        return blocks


def kv_transfer_seconds(tokens: int, bytes_per_token: int, bandwidth: float, latency_s: float) -> float:
    """Time to move `tokens` tokens of KV over a link of `bandwidth` bytes/s."""
    if tokens <= 0:
        return 0.0
    if not bandwidth > 0 or math.isinf(bandwidth):
        return latency_s
    return latency_s + tokens * bytes_per_token / bandwidth

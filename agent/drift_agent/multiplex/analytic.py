"""Roofline performance model, used when no measured profile exists for (model, device, dtype).

time = max(compute time, memory time) + a per-layer launch overhead, where

- compute time = FLOPs / (peak · s/S · compute_eff): tensor-core throughput is proportional to the SMs a
  phase owns;
- memory time = bytes / (bw · f(s/S) · bw_eff): HBM bandwidth is *not* proportional to SMs. Each SM sustains
  a bounded number of outstanding memory requests (Little's law), so bandwidth grows ~linearly with SMs at
  first and then saturates at the HBM peak; microbenchmarks on H100/A100 reach most of peak bandwidth with
  about a third of the SMs. We model the share with the saturating curve
  f(x) = (1 − e^(−x/x0)) / (1 − e^(−1/x0)), x = s/S, f(0)=0, f(1)=1, concave and increasing; with the
  default x0 = 0.15 a phase on 30% of the SMs gets ~87% of the bandwidth.

FLOPs count every GEMM (2·tokens·params), causal attention including the cached prefix
(4·heads·head_dim·Σ(T·P + T(T+1)/2) per layer) and the LM head (last token per sequence in prefill, every
sequence in decode). Bytes count the weights once per forward, the KV read (prefix / whole context) and
written (new tokens), and a small activation term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .devices import DeviceSpec
from .perf_model import PerfModel, PrefillShape
from .schema import Contention

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    mlp_matrices: int = 3  # gated MLP (gate, up, down); 2 for a plain MLP

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model shape: {name} must be positive")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any, dtype: str = "bfloat16") -> ModelShape:
        """From a Hugging Face config (a dict or a `PretrainedConfig`)."""

        def get(key: str, default: Any = None) -> Any:
            return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)

        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(get("intermediate_size") or 4 * hidden),
            vocab_size=int(get("vocab_size")),
            dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        )

    @cached_property
    def layer_params(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o + self.mlp_matrices * self.hidden_size * self.intermediate_size

    @cached_property
    def weight_bytes(self) -> int:
        """Bytes streamed per forward: every layer plus the LM head (the embedding is a gather)."""
        return (self.num_layers * self.layer_params + self.vocab_size * self.hidden_size) * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def bandwidth_share(fraction: float, x0: float = 0.15) -> float:
    """Share of peak memory bandwidth reachable with `fraction` of the SMs (see module docstring)."""
    if fraction <= 0:
        return 0.0
    fraction = min(fraction, 1.0)
    return (1.0 - math.exp(-fraction / x0)) / (1.0 - math.exp(-1.0 / x0))


class AnalyticPerfModel(PerfModel):
    def __init__(
        self,
        shape: ModelShape,
        device: DeviceSpec,
        *,
        compute_eff: float = 0.6,
        bw_eff: float = 0.8,
        bw_saturation: float = 0.15,
        overhead_per_layer_s: float = 30e-6,
        contention: Contention | None = None,
    ) -> None:
        if not (0 < compute_eff <= 1 and 0 < bw_eff <= 1 and bw_saturation > 0 and overhead_per_layer_s >= 0):
            raise ValueError("analytic model: efficiencies in (0, 1], bw_saturation > 0, overhead >= 0")
        self.shape = shape
        self.device = device
        self.total_sms = device.sms
        self.num_layers = shape.num_layers
        self.layer_fractions = None
        self.contention = contention or Contention()
        self.compute_eff = compute_eff
        self.bw_eff = bw_eff
        self.bw_saturation = bw_saturation
        self.overhead_s = overhead_per_layer_s * shape.num_layers
        self._rates: dict[int, tuple[float, float]] = {}  # SMs -> (FLOP/s, bytes/s) reachable
        # Per-token constants of a decode step (the simulator costs millions of them).
        m = shape
        self._flops_per_seq = 2.0 * m.num_layers * m.layer_params + 2.0 * m.hidden_size * m.vocab_size
        self._flops_per_kv = 4.0 * m.num_layers * m.num_heads * m.head_dim
        self._act_bytes_per_seq = m.num_layers * (4 * m.hidden_size + 2 * m.intermediate_size) * m.dtype_bytes

    def _rates_on(self, sms: int) -> tuple[float, float]:
        rates = self._rates.get(sms)
        if rates is None:
            frac = sms / self.total_sms
            rates = self._rates[sms] = (
                self.device.peak_flops * frac * self.compute_eff,
                self.device.mem_bw * bandwidth_share(frac, self.bw_saturation) * self.bw_eff,
            )
        return rates

    def _roofline(self, flops: float, nbytes: float, sms: int) -> float:
        rates = self._rates_on(sms)
        return max(flops / rates[0], nbytes / rates[1]) + self.overhead_s

    def prefill_flops_bytes(
        self, shapes: list[PrefillShape], rows: int = 0, row_context: int = 0
    ) -> tuple[float, float]:
        """FLOPs and bytes of a prefill batch: `shapes`, then `rows` one-token shapes on `row_context` tokens."""
        m = self.shape
        new = cached = 0
        pairs = 0.0  # (query, key) pairs of causal attention
        for s in shapes:  # one pass: the dispatcher costs growing candidate batches often
            t, c = s.new_tokens, s.cached_tokens
            new += t
            cached += c
            pairs += t * c + t * (t + 1) / 2
        if rows:
            # Each row adds row_context + 1 pairs. Every term is a whole number far below 2**53, so the float
            # sum is exact in any order: the same value as a shape per row.
            new += rows
            cached += rows * row_context
            pairs += rows * (row_context + 1)
        flops = (
            2.0 * new * m.num_layers * m.layer_params
            + 4.0 * m.num_layers * m.num_heads * m.head_dim * pairs
            + 2.0 * (len(shapes) + rows) * m.hidden_size * m.vocab_size
        )
        act = m.num_layers * new * (4 * m.hidden_size + 2 * m.intermediate_size) * m.dtype_bytes
        nbytes = m.weight_bytes + m.kv_bytes_per_token * (new + cached) + act
        return flops, float(nbytes)

    def decode_flops_bytes(self, batch_size: int, kv_tokens: int) -> tuple[float, float]:
        m = self.shape
        flops = batch_size * self._flops_per_seq + self._flops_per_kv * kv_tokens
        nbytes = m.weight_bytes + m.kv_bytes_per_token * kv_tokens + batch_size * self._act_bytes_per_seq
        return flops, float(nbytes)

    def _prefill_base(self, shapes: list[PrefillShape], sms: int) -> float:
        # The closed form with no rows (so a subclass adjusts `_prefill_base_with_rows` alone).
        return self._prefill_base_with_rows(shapes, 0, 0, sms)

    def _prefill_base_with_rows(
        self, chunks: list[PrefillShape], rows: int, row_context: int, sms: int
    ) -> float:
        return self._roofline(*self.prefill_flops_bytes(chunks, rows, row_context), sms)

    def _decode_base(self, batch_size: int, kv_tokens: int, sms: int) -> float:
        return self._roofline(*self.decode_flops_bytes(batch_size, kv_tokens), sms)

    def _decode_base_many(self, batch_size: int, kv_tokens: np.ndarray, sms: int) -> np.ndarray:
        # `_decode_base` in array form, operation for operation (integer byte counts stay exact in int64).
        m = self.shape
        flops = batch_size * self._flops_per_seq + self._flops_per_kv * kv_tokens
        nbytes = m.weight_bytes + m.kv_bytes_per_token * kv_tokens + batch_size * self._act_bytes_per_seq
        rates = self._rates_on(sms)
        return np.maximum(flops / rates[0], nbytes.astype(float) / rates[1]) + self.overhead_s

"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Qwen3, Mistral) over the paged KV pool.

Module names follow Hugging Face's, except that q/k/v and gate/up projections are fused (`qkv_proj`,
`gate_up_proj`) and every projection stores its weight transposed, [in, out]: one GEMM instead of three or two,
and single-threaded MKL runs small-M GEMMs (decode batches) 1.3-1.5x faster on a contiguous [K, N] operand
than on the transposed [N, K] one nn.Linear hands it. `checkpoint_targets()` maps each Hugging Face weight
name onto its slice of the fused parameters, so checkpoints still load by name.

Tokens of all sequences are flattened to [N, hidden]; attention reads each sequence's context through
AttentionMetadata. Everything that depends only on the step (rotary cos/sin, attention gather indices and masks)
lives in a ForwardPlan built once per forward and passed down explicitly: no global state, so two threads can
run two batches at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drift_agent.core.errors import ModelLoadError
from drift_agent.models.attention import AttentionBackend, Window, create_backend, write_kv
from drift_agent.models.attention_metadata import AttentionMetadata
from drift_agent.models.onednn_linear import (
    ONEDNN_MAX_BYTES,
    OneDnnWeight,
    onednn_linear_available,
    use_onednn,
)
from drift_agent.models.rotary import RotaryEmbedding, apply_rotary

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)

# (hidden states, residual stream); residual is None before the first layer (vLLM's convention, which lets
# a later fused add+norm kernel drop in without changing the layer interface).
HiddenPair = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class CheckpointTarget:
    """Where one checkpoint tensor goes: `dest` is a view into a parameter; checkpoints store `shape`."""

    dest: torch.Tensor
    shape: tuple[int, ...]
    transposed: bool  # dest holds the tensor transposed ([in, out] of an [out, in] checkpoint weight)


@dataclass
class ForwardPlan:
    """Per-step tensors shared by every layer of one forward pass."""

    attn: AttentionMetadata
    cos: torch.Tensor
    sin: torch.Tensor
    backend_plan: Any


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def layer_windows(config: Any) -> list[Window]:
    """Sliding window per layer: by `layer_types` when the config has them (Qwen2/3), else config-wide."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if layer_types is not None:
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    return [int(window)] * config.num_hidden_layers


_CPU_RMS_UNFUSED_NUMEL = 1 << 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if x.device.type == "cpu" and x.numel() >= _CPU_RMS_UNFUSED_NUMEL:
                # On CPU F.rms_norm is a composite whose reduction is ~3x slower than this at prefill sizes
                # (5.8 vs 1.8 ms on [2048, 576]); same operations as HF's, so bit-identical.
                scale = x.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()
                return (x * scale).mul_(self.weight)
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Half precision: normalise in fp32 and scale after casting back, as HF does.
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


class FusedLinear(nn.Module):
    """One or more Hugging Face linears side by side: `weight_t` [in, sum(out)], optional bias [sum(out)].

    `parts` names each original projection and its output width, in column order.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = dict(parts)
        self.out_features = sum(parts.values())
        self.weight_t = nn.Parameter(torch.empty(in_features, self.out_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.onednn: OneDnnWeight | None = None  # set by LlamaForCausalLM.enable_onednn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(self.onednn, x):
            return self.onednn.linear(x, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def checkpoint_targets(self, prefix: str) -> dict[str, CheckpointTarget]:
        """`{prefix}{part}.weight` (and `.bias`) of each fused projection -> its columns here."""
        targets: dict[str, CheckpointTarget] = {}
        col = 0
        for name, width in self.parts.items():
            cols = slice(col, col + width)
            targets[f"{prefix}{name}.weight"] = CheckpointTarget(
                self.weight_t[:, cols], (width, self.in_features), True
            )
            if self.bias is not None:
                targets[f"{prefix}{name}.bias"] = CheckpointTarget(self.bias[cols], (width,), False)
            col += width
        return targets


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, window: Window, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.window = window
        self.backend = backend
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.qkv_proj = FusedLinear(hidden, {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim}, qkv_bias)
        self.o_proj = FusedLinear(q_dim, {"o_proj": hidden}, o_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_flat: torch.Tensor | None = None
        self.v_flat: torch.Tensor | None = None

    def bind(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        self.v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, plan: ForwardPlan, rotary_dim: int) -> torch.Tensor:
        if self.k_cache is None:
            raise RuntimeError("KV cache is not bound; call model.bind_kv_cache() before forward")
        n = x.shape[0]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk_dim = self.q_dim + self.kv_dim
        # Column views of the fused output: no copies until rotary writes its result.
        v = qkv[:, qk_dim:].view(n, kv_heads, hd)
        if self.qk_norm:
            q = apply_rotary(
                self.q_norm(qkv[:, : self.q_dim].view(n, heads, hd)), plan.cos, plan.sin, rotary_dim
            )
            k = apply_rotary(
                self.k_norm(qkv[:, self.q_dim : qk_dim].view(n, kv_heads, hd)), plan.cos, plan.sin, rotary_dim
            )
        else:
            # q and k heads share positions: rotate them in one pass.
            qk = apply_rotary(qkv[:, :qk_dim].view(n, heads + kv_heads, hd), plan.cos, plan.sin, rotary_dim)
            q, k = qk[:, :heads], qk[:, heads:]
        write_kv(k, v, self.k_flat, self.v_flat, plan.attn.slot_mapping)
        o = self.backend.attend(q, k, v, self.k_cache, self.v_cache, plan.backend_plan, self.window)
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        hidden, inter = config.hidden_size, config.intermediate_size
        self.intermediate_size = inter
        self.gate_up_proj = FusedLinear(hidden, {"gate_proj": inter, "up_proj": inter}, bias)
        self.down_proj = FusedLinear(inter, {"down_proj": hidden}, bias)
        act = config.hidden_act
        self.silu = act in ("silu", "swish")
        if not self.silu:
            from transformers.activations import ACT2FN

            self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        if self.silu:
            # In place on the fused buffer: no [N, intermediate] temporaries (a fresh one per layer costs
            # page faults at prefill sizes). down_proj reads the strided view directly.
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, window: Window, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, window, backend)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, plan: ForwardPlan, rotary_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = h if residual is None else h + residual
        h = self.self_attn(self.input_layernorm(residual), plan, rotary_dim)
        residual = h + residual
        return self.mlp(self.post_attention_layernorm(residual)), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        windows = layer_windows(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, windows[i], backend) for i in range(len(windows))
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: Any, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary
        self.attn_backend = backend
        self.model = LlamaModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.windows: list[Window] = layer_windows(config)
        self.head_onednn: OneDnnWeight | None = None

    @property
    def attention_backend(self) -> str:
        return self.attn_backend.name

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            if self.head_onednn is not None:
                self.head_onednn = OneDnnWeight(self.lm_head.weight, transposed=False)

    def enable_onednn(self) -> bool:
        """Keep oneDNN-reordered copies of every projection and of the LM head for decode-sized batches
        (see onednn_linear). Only on CPU in float32, and only while the copies fit ONEDNN_MAX_BYTES."""
        linears = [m for m in self.modules() if isinstance(m, FusedLinear)]
        head = self.lm_head.weight
        extra = (
            sum(m.weight_t.numel() for m in linears) * head.element_size()
            + head.numel() * head.element_size()
        )
        if head.device.type != "cpu" or head.dtype != torch.float32 or extra > ONEDNN_MAX_BYTES:
            return False
        if not onednn_linear_available():
            return False
        for m in linears:
            m.onednn = OneDnnWeight(m.weight_t, transposed=True)
        self.head_onednn = OneDnnWeight(head, transposed=False)
        return True

    def checkpoint_targets(self) -> dict[str, CheckpointTarget]:
        """Every Hugging Face checkpoint name this model loads -> where its tensor goes (a tied lm_head is
        not listed: it is embed_tokens)."""
        targets: dict[str, CheckpointTarget] = {}
        fused: set[str] = set()
        for name, module in self.named_modules():
            if isinstance(module, FusedLinear):
                parent = name.rpartition(".")[0]
                targets.update(module.checkpoint_targets(f"{parent}." if parent else ""))
                fused.update(f"{name}.{p}" for p, _ in module.named_parameters())
        for name, param in self.named_parameters():  # tied lm_head shares embed_tokens' entry: not listed
            if name not in fused:
                targets[name] = CheckpointTarget(param, tuple(param.shape), False)
        return targets

    def bind_kv_cache(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Attach per-layer (k_cache, v_cache) pools, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} (k, v) cache pairs, got {len(kv_caches)}")
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            if k_cache.dim() != 4 or k_cache.shape[2:] != (self.num_kv_heads, self.head_dim):
                raise ValueError(
                    f"KV cache must be [num_blocks, block_size, {self.num_kv_heads}, {self.head_dim}], "
                    f"got {tuple(k_cache.shape)}"
                )
            if v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
                raise ValueError("k and v caches must be contiguous and of equal shape")
            layer.self_attn.bind(k_cache, v_cache)

    def prepare(self, positions: torch.Tensor, attn: AttentionMetadata | ForwardPlan) -> ForwardPlan:
        """Build the per-step plan once; pass it to several forward_layers() calls to avoid rebuilding it."""
        if isinstance(attn, ForwardPlan):
            return attn
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = self.rotary.cos_sin(positions, dtype)
        return ForwardPlan(attn, cos, sin, self.attn_backend.plan(attn, set(self.windows)))

    def embed(self, input_ids: torch.Tensor) -> HiddenPair:
        return self.model.embed_tokens(input_ids), None

    def forward_layers(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        attn: AttentionMetadata | ForwardPlan,
        start: int,
        end: int,
    ) -> HiddenPair:
        """Run layers [start, end). `attn` may be a ForwardPlan from prepare() (cheaper when called per block)."""
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) outside [0, {self.num_layers})")
        plan = self.prepare(positions, attn)
        rotary_dim = self.rotary.rotary_dim
        for layer in self.model.layers[start:end]:
            h, residual = layer(h, residual, plan, rotary_dim)
        return h, residual

    def finalize(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.model.norm(h if residual is None else h + residual)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata | ForwardPlan
    ) -> torch.Tensor:
        h, residual = self.embed(input_ids)
        h, residual = self.forward_layers(h, residual, positions, attn, 0, self.num_layers)
        return self.finalize(h, residual)

    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32 logits (only the rows the sampler needs)."""
        if use_onednn(self.head_onednn, hidden_rows):
            return self.head_onednn.linear(hidden_rows, None).float()
        return self.lm_head(hidden_rows).float()


def resolve_dtype(dtype: str | torch.dtype, config: Any, device: torch.device) -> torch.dtype:
    """`auto` means the checkpoint's dtype on CUDA and float32 on CPU (half-precision CPU matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(cfg, str):
            cfg = getattr(torch, cfg, None)
        return cfg if cfg in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return table[dtype]


def build_model(
    hf_config: Any,
    dtype: str | torch.dtype,
    device: torch.device | str,
    attention_backend: str = "auto",
    init_weights: bool = False,
) -> LlamaForCausalLM:
    """Construct the model on `device` without initialising weights (the loader fills them), in eval mode.

    Parameters are created on the meta device and materialised once, so a checkpoint never needs two copies
    in memory. `init_weights=True` fills N(0, initializer_range) instead (for profiling without a checkpoint).
    """
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelLoadError(
            f"unsupported architecture {archs or hf_config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    device = torch.device(device)
    dtype = resolve_dtype(dtype, hf_config, device)
    head_dim = head_dim_of(hf_config)
    rotary = RotaryEmbedding(hf_config, head_dim, device)
    backend = create_backend(
        attention_backend,
        device,
        dtype,
        hf_config.num_attention_heads,
        hf_config.num_key_value_heads,
        head_dim,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config, rotary, backend).to(dtype)
    model = model.to_empty(device=device)
    if init_weights:
        std = float(getattr(hf_config, "initializer_range", 0.02))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
    model.tie_weights()
    if init_weights:
        model.enable_onednn()
    return model.eval()

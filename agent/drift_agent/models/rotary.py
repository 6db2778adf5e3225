"""Rotary position embedding with Hugging Face's own RoPE-scaling initialisers (default, linear, llama3, yarn).

Frequencies are computed once at build time; cos/sin are computed once per forward for that step's positions
and shared by every layer.
"""

from __future__ import annotations

from typing import Any

import torch

from drift_agent.core.errors import ModelLoadError

# Scalings whose frequencies do not depend on the current sequence length; `dynamic` and `longrope` switch
# frequencies by length at run time, which a paged cache of already-rotated keys cannot follow.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


def rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


class RotaryEmbedding:
    """Holds inv_freq for one model; `cos_sin(positions)` returns the tables applied to q and k."""

    def __init__(self, config: Any, head_dim: int, device: torch.device) -> None:
        params = rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"unsupported RoPE scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            base = float(params.get("rope_theta", 10000.0))
            rot_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
            exponents = torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim
            inv_freq, scaling = 1.0 / (base**exponents), 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        # YaRN's attention_factor scales cos/sin (HF does the same), which scales q.k by its square.
        self.attention_scaling = float(scaling)
        self.rotary_dim = 2 * self.inv_freq.numel()
        self.head_dim = head_dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] positions -> (cos, signed sin), each [N, 1, 2, rotary_dim // 2] in `dtype`.

        The sin table carries rotate_half's sign ([-sin, sin]), so applying RoPE is one flip and one addcmul.
        """
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        cos2 = torch.stack((cos, cos), dim=1).to(dtype)
        sin2 = torch.stack((-sin, sin), dim=1).to(dtype)
        return cos2.unsqueeze(1), sin2.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate [N, heads, head_dim] by HF's rotate_half convention (first half paired with second half)."""
    n, heads, head_dim = x.shape
    if rotary_dim == head_dim:
        halves = x.view(n, heads, 2, head_dim // 2)
        return torch.addcmul(halves * cos, halves.flip(2), sin).view(n, heads, head_dim)
    rot = x[..., :rotary_dim].reshape(n, heads, 2, rotary_dim // 2)
    rotated = torch.addcmul(rot * cos, rot.flip(2), sin).view(n, heads, rotary_dim)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)

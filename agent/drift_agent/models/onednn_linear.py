"""oneDNN linear with pre-reordered weights, for the decode-sized GEMMs on CPU.

With weights streamed from DRAM (a model's layers never fit in cache), MKL's sgemm is slow for a few rows:
it re-packs the weight panel on every call. oneDNN's `_linear_pointwise` on a weight reordered once into its
blocked layout does not, and measured on a 1-thread AVX-512 Xeon (fp32, SmolLM2-135M shapes, cold weights):

    rows            1     2     4     8     16    32    48    128
    sgemm (ms)      28    46    57    78    90    94    93    254
    oneDNN (ms)     42    49    49    58    71    90    122   272

and 1.3-2.4x on the [49152, 576] lm_head for 4-32 rows. So oneDNN takes the rows in ONEDNN_ROWS and sgemm the
rest (single-token decode, prefill chunks); the reordered copy costs a second copy of the weight, so it is kept
only for models whose packed weights fit ONEDNN_MAX_BYTES.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ONEDNN_ROWS: tuple[int, int] = (4, 32)
ONEDNN_MAX_BYTES = 2 * 2**30

_checked: bool | None = None


def onednn_linear_available() -> bool:
    """The private ops exist and agree with torch.mm on a random problem (checked once per process)."""
    global _checked
    if _checked is None:
        _checked = _self_test()
    return _checked


def _self_test() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(40, 24, generator=gen)
        b = torch.randn(40, generator=gen)
        x = torch.randn(8, 48, generator=gen)[:, ::2]  # strided rows, as the MLP's fused buffer gives
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        ok = torch.allclose(got, torch.addmm(b, x, w.t()), rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError, AttributeError) as exc:
        log.debug("oneDNN linear unavailable: %s", exc)
        return False
    if not ok:
        log.warning("oneDNN linear disagrees with torch.mm; using torch.mm only")
    return ok


class OneDnnWeight:
    """A oneDNN-reordered copy of a linear weight, re-made whenever the source parameter is modified in place
    (its version counter moves), so loading new weights can never leave it stale.

    `source` is the [out, in] weight, or the [in, out] one with `transposed=True`.
    """

    def __init__(self, source: torch.Tensor, transposed: bool) -> None:
        self.source = source
        self.transposed = transposed
        self.version = -1
        self.packed: torch.Tensor | None = None
        self.refresh()

    @property
    def nbytes(self) -> int:
        return self.source.numel() * self.source.element_size()

    def refresh(self) -> None:
        if self.version == self.source._version and self.packed is not None:
            return
        with torch.no_grad():
            weight = self.source.t() if self.transposed else self.source
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.version = self.source._version

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.refresh()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def use_onednn(weight: OneDnnWeight | None, x: torch.Tensor) -> bool:
    return weight is not None and ONEDNN_ROWS[0] <= x.shape[0] <= ONEDNN_ROWS[1]

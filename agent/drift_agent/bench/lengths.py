"""Token-length distributions for the synthetic workloads, fitted to published data-set statistics.

Nothing can be downloaded, so `sharegpt-like` and `lmsys-like` draw lengths from clipped lognormals whose
*clipped* mean equals the published mean (mu is solved numerically for that; sigma sets the tail and is our
assumption, because the sources publish means and histograms, not fitted parameters). Sources:

- ShareGPT: mean input 161.31 and mean output 337.99 tokens, from Fig. 11 of Kwon et al., "Efficient Memory
  Management for Large Language Model Serving with PagedAttention" (SOSP'23, the vLLM paper), which used the
  OPT/LLaMA tokenizer. Approximate (quoted from the paper's figure caption as recalled, not re-measured). Clipped
  like vLLM's ShareGPT loader filters: prompts in [4, 1024], outputs in [4, 1024].
- LMSYS-Chat-1M: mean 69.5 tokens per prompt and 214.5 per response, 2.0 turns per conversation on average,
  from Table 1 of Zheng et al., "LMSYS-Chat-1M: A Large-Scale Real-World LLM Conversation Dataset" (ICLR'24,
  arXiv 2309.11998). Clipped to [2, 2048] on both sides.
- Shape (sigma) choices: 1.2 for ShareGPT inputs and 1.0 for outputs; 1.3 for LMSYS prompts (many one-line
  questions plus a long tail of pasted documents) and 1.0 for responses. Medians are therefore well below the
  means, as in both papers' histograms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr  # the normal CDF (scipy.stats' norm.cdf; importing scipy.stats costs 0.6 s)


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(X, lo, hi)] for X ~ LogNormal(mu, sigma), in closed form."""
    a, b = math.log(lo), math.log(hi)
    below = lo * ndtr((a - mu) / sigma)
    above = hi * ndtr((mu - b) / sigma)  # the survival function, as norm.sf computes it
    inside = math.exp(mu + sigma**2 / 2) * (
        ndtr((b - mu - sigma**2) / sigma) - ndtr((a - mu - sigma**2) / sigma)
    )
    return float(below + above + inside)


@dataclass(frozen=True, slots=True)
class LogNormalLengths:
    """Integer lengths round(X) clipped to [lo, hi], X lognormal with the clipped mean equal to `mean`."""

    mean: float
    sigma: float
    lo: int
    hi: int
    mu: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (1 <= self.lo < self.mean < self.hi):
            raise ValueError(f"need 1 <= lo < mean < hi, got lo={self.lo} mean={self.mean} hi={self.hi}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        # Location parameter solved so the clipped mean hits `mean` (monotone in mu, so one root).
        span = 10 * self.sigma
        mu = brentq(
            lambda m: clipped_lognormal_mean(m, self.sigma, self.lo, self.hi) - self.mean,
            math.log(self.lo) - span,
            math.log(self.hi) + span,
        )
        object.__setattr__(self, "mu", float(mu))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raw = rng.lognormal(self.mu, self.sigma, size=n)
        return np.clip(np.rint(raw), self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True, slots=True)
class UniformLengths:
    """Integers uniform in [floor(mean*(1-r)), ceil(mean*(1+r))], vLLM's random-dataset rule (at least 1)."""

    mean: int
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"length must be >= 1, got {self.mean}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {self.range_ratio}")

    @property
    def bounds(self) -> tuple[int, int]:
        lo = max(1, math.floor(self.mean * (1 - self.range_ratio)))
        return lo, max(lo, math.ceil(self.mean * (1 + self.range_ratio)))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.bounds
        return rng.integers(lo, hi + 1, size=n)


SHAREGPT_INPUT = LogNormalLengths(mean=161.31, sigma=1.2, lo=4, hi=1024)
SHAREGPT_OUTPUT = LogNormalLengths(mean=337.99, sigma=1.0, lo=4, hi=1024)
LMSYS_PROMPT = LogNormalLengths(mean=69.5, sigma=1.3, lo=2, hi=2048)
LMSYS_RESPONSE = LogNormalLengths(mean=214.5, sigma=1.0, lo=2, hi=2048)

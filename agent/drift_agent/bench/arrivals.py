"""Precomputed request arrival times, as vLLM's `get_request` computes them.

Inter-arrival gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate and coefficient of
variation 1/sqrt(burstiness). burstiness=1 is a Poisson process, <1 is burstier, >1 smoother, inf is a constant
gap. Like vLLM, the cumulative times are rescaled so the last arrival lands exactly at n/rate (the raw sum
misses that target by 1-2%, which would make throughput differ between seeds). rate=inf sends everything at t=0.
Every engine compared gets identical times because they depend only on (n, rate, burstiness, seed).
"""

from __future__ import annotations

import math

import numpy as np


def _check(rate: float, burstiness: float) -> None:
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")


def gamma_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """n raw inter-arrival gaps in seconds (not rescaled); zeros when rate is inf."""
    _check(rate, burstiness)
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send offsets (seconds from benchmark start) of n requests; the last equals n/rate exactly."""
    if n <= 0:
        return np.zeros(0)
    times = np.cumsum(gamma_gaps(n, rate, burstiness, seed))
    if times[-1] > 0:
        times *= (n / rate) / times[-1]
    return times

"""Load generation and measurement for OpenAI-compatible servers (`drift bench serve`).

The pure modules (`workloads`, `lengths`, `prompts`, `arrivals`, `metrics`, `sweep`, `plot`) hold no network code,
so the simulator (`drift sim`) reuses them with simulated clocks; `client` and `runner` do the HTTP side.
"""

from __future__ import annotations

from ..core.errors import DriftError


class BenchError(DriftError):
    """A benchmark cannot run as asked (bad workload file, tokenizer, option combination)."""


class ServerUnreachableError(BenchError):
    """The server did not answer, or rejected the probe request."""

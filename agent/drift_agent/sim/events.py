"""Event kinds of the simulation's queue and their order at equal times.

Arrivals, KV transfers and migration stages come first, then step ends, then wake-ups of idle instances (so
requests that arrive at the instant a step ends are seen by the next step, as in the engine's loop), then load
samples.
"""

from __future__ import annotations

ARRIVAL, TRANSFER, STAGE, COMMIT, STEP, WAKE, SAMPLE = range(7)
PRIORITY: dict[int, int] = {ARRIVAL: 0, TRANSFER: 0, STAGE: 0, COMMIT: 0, STEP: 1, WAKE: 2, SAMPLE: 3}

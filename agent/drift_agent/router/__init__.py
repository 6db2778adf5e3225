"""`drift router`: the OpenAI-compatible HTTP front door of a Drift service.

It forwards each request to one agent (`drift serve`) chosen by a routing policy of `drift_agent.routing` over
live load polled from every agent's `GET /state`, passes streams through chunk by chunk, and retries a request
refused before its first byte on another agent. aiohttp on both sides (server and one pooled upstream client),
on uvloop when it is installed; no FastAPI, no torch.

- `errors.py`: OpenAI-shaped error bodies and responses.
- `backend.py`: one agent as the policies see it (`InstanceView` from its polled state plus what the router
  just sent), and the pool of agents with their pollers.
- `proxy.py`: forwarding: choosing a backend, retries, the upstream of a response, the stream relay.
- `metrics.py`: `drift_router_*` Prometheus metrics.
- `app.py`: settings, the aiohttp application and `serve()`.
- `cli.py`: `drift router`.
- `discovery.py`: Kubernetes discovery of the agents (`--discover`).
"""

from __future__ import annotations

# Shutdown defaults, here so the operator sizes the router pod's termination grace period without importing
# the server side (aiohttp).
DEFAULT_DRAIN_S = 5.0  # SIGTERM -> listener closed: /ready is 503 and requests are still served
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # listener closed -> open requests (streams) cut


def worst_case_shutdown_s(
    drain_s: float = DEFAULT_DRAIN_S, shutdown_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
) -> float:
    """From SIGTERM to exit at the latest."""
    return drain_s + shutdown_s

"""Request routing shared by the simulator (`drift sim`) and the HTTP router (`drift router`): the policies
that pick an instance for a request over a small read-only view of each instance, and the affinity key of an
OpenAI request. Pure Python, torch-free: imports only `core` and `multiplex`."""

from __future__ import annotations

from .affinity import affinity_key
from .policies import (
    ROUTERS,
    LeastLoadedRouter,
    PrefixAffinityRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    RouteRequest,
    SLOAwareRouter,
    make_router,
)
from .view import InstanceView, blocks_needed

__all__ = [
    "ROUTERS",
    "InstanceView",
    "LeastLoadedRouter",
    "PrefixAffinityRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "RouteRequest",
    "Router",
    "SLOAwareRouter",
    "affinity_key",
    "blocks_needed",
    "make_router",
]

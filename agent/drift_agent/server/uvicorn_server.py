"""uvicorn's Server with a drain phase in front of its own shutdown."""

from __future__ import annotations

from typing import Any

import uvicorn

from .drain import InFlight


class DrainingServer(uvicorn.Server):
    """On SIGTERM, first drain while still listening: /ready fails and new requests get 503 (so the load
    balancer moves on), running requests finish up to the deadline, the rest end with finish_reason "abort".
    Only then does uvicorn close its sockets and run the app's lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, drain: InFlight, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: Any = None) -> None:
        await self.drain.drain(self.drain_timeout_s)
        await super().shutdown(sockets)

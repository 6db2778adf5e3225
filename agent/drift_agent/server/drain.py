"""In-flight request tracking and the shutdown drain: refuse new work, let running requests finish up to a
deadline, then abort the rest so each still gets a proper end (finish_reason "abort") rather than a cut socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .generation import GenerationGroup
from .settings import DRAIN_FLUSH_S

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self) -> None:
        self.draining = False
        self._groups: set[GenerationGroup] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, group: GenerationGroup) -> None:
        """Track `group` for as long as its HTTP response is being produced."""
        self._groups.add(group)
        self._idle.clear()

    def remove(self, group: GenerationGroup) -> None:
        self._groups.discard(group)
        if not self._groups:
            self._idle.set()

    def abort_all(self, reason: str) -> int:
        groups = list(self._groups)
        for group in groups:
            group.abort(reason)
        return len(groups)

    async def drain(self, timeout_s: float, flush_s: float = DRAIN_FLUSH_S) -> bool:
        """Stop accepting, wait up to `timeout_s` for in-flight responses, then abort what is left and give
        those responses up to `flush_s` to send their last chunk. True when everything finished on its own."""
        self.draining = True
        if not self._groups:
            return True
        log.info("draining %d in-flight request(s) for up to %.1f s", len(self._groups), timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            pass
        n = self.abort_all("shutdown")
        log.warning("shutdown deadline reached: aborted %d request(s)", n)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), flush_s)
        return False

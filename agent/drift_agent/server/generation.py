"""One HTTP request's engine requests (its n choices times its prompts), merged into one ordered stream.

Each engine request is consumed by a pump task that forwards its outputs to a shared queue, so `abort()` can end
every choice at once from anywhere (client disconnect, shutdown deadline): it cancels the pumps, tells the
engine to free the requests' KV blocks, and hands the consumer an `ABORTED` marker per unfinished choice, so a
response still in progress can be closed properly instead of being cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..core.sampling_params import SamplingParams
from ..core.sequence import SLO, RequestTimes
from ..engine.async_engine import AsyncLLMEngine
from ..engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class Aborted:
    """Marker: this choice ended without a normal finish (`reason`: "disconnect", "shutdown", ...)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Aborted({self.reason!r})"


Item = RequestOutput | Aborted | BaseException


@dataclass
class Choice:
    index: int
    request_id: str
    slo: SLO
    arrival: float
    stream: AsyncIterator[RequestOutput] | None = None
    last: RequestOutput | None = None
    done: bool = False
    task: asyncio.Task | None = None


# Called once per engine request when it ends: (choice, final output or None, aborted?, now).
EndCallback = Callable[[Choice, RequestOutput | None, bool, float], None]


@dataclass(eq=False)  # identity semantics: groups live in sets
class GenerationGroup:
    engine: AsyncLLMEngine
    on_end: EndCallback
    choices: list[Choice] = field(default_factory=list)
    _queue: asyncio.Queue[tuple[int, Item]] = field(default_factory=asyncio.Queue)
    _open: int = 0
    _aborted: bool = False

    async def add(
        self, index: int, prompt: list[int], params: SamplingParams, slo: SLO, arrival: float
    ) -> None:
        """Submit one engine request; the engine's validation and overload errors raise here."""
        choice = Choice(index, f"{uuid.uuid4().hex}-{index}", slo, arrival)
        choice.stream = await self.engine.generate(prompt, params, choice.request_id, slo, arrival)
        self.choices.append(choice)

    def start(self) -> None:
        for choice in self.choices:
            self._open += 1
            choice.task = asyncio.create_task(self._pump(choice), name=f"drift-pump-{choice.request_id}")

    async def _pump(self, choice: Choice) -> None:
        assert choice.stream is not None
        try:
            async for out in choice.stream:
                choice.last = out
                if out.finished:
                    self._end(choice, out, aborted=False)
                self._queue.put_nowait((choice.index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request failed in the engine, or the engine died: the consumer says so
            self._end(choice, None, aborted=True)
            self._queue.put_nowait((choice.index, exc))
            return
        if not choice.done:  # a stream that ends without a final output must not leave the consumer waiting
            self._end(choice, None, aborted=True)
            self._queue.put_nowait(
                (choice.index, RuntimeError(f"request {choice.request_id} ended without a final output"))
            )

    def _end(self, choice: Choice, final: RequestOutput | None, aborted: bool) -> None:
        if choice.done:
            return
        choice.done = True
        try:
            self.on_end(choice, final, aborted, time.monotonic())
        except Exception:  # accounting (metrics) must never keep a response from its client
            log.exception("end-of-request callback failed for %s", choice.request_id)

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    def abort(self, reason: str) -> None:
        """End every unfinished choice now (idempotent, synchronous: safe in a cancelled generator's finally)."""
        for choice in self.choices:
            if choice.done:
                continue
            self._end(choice, None, aborted=True)
            if choice.task is not None:
                choice.task.cancel()
            # A pump that never ran never entered the engine stream, whose own cleanup would abort it.
            self.engine.abort(choice.request_id)
            self._queue.put_nowait((choice.index, Aborted(reason)))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Item]]:
        """(choice index, item) until every choice has finished, failed or been aborted."""
        remaining = len(self.choices)
        while remaining:
            index, item = await self._queue.get()
            if not isinstance(item, RequestOutput) or item.finished:
                remaining -= 1
            yield index, item


def times_of(choice: Choice) -> RequestTimes:
    """The engine's timestamps for a choice; an aborted choice without any output has only its arrival."""
    return choice.last.times if choice.last is not None else RequestTimes(arrival=choice.arrival)

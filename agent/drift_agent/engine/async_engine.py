"""asyncio front of the engine: the model loop runs in its own thread; each request streams its outputs
through an asyncio queue. Cancelling the consumer (a client disconnect) aborts the request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections import abc
from dataclasses import dataclass

from ..core.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, is_fatal_error
from ..core.sampling_params import SamplingParams
from ..core.sequence import SLO, Sequence
from .llm_engine import LLMEngine
from .outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)


Item = RequestOutput | BaseException


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]


def _put_all(items: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class RequestStream:
    """The outputs of one request, as an async iterator. Leaving it before the request finished (break,
    cancellation, a client disconnect) or dropping it unread aborts the request and frees its KV blocks."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._stream.queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    def __del__(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting_requests or engine.config.max_waiting_requests
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the pending-add count
        self._pending_adds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Outputs of the current step (and commands), handed to each event loop in ONE thread-safe call at
        # the end: per output, the wake-ups and the GIL hand-overs with the engine thread cost the most.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
        self.error: BaseException | None = None
        self._stats = engine.stats()
        # Hooks called on the engine thread after each step (metrics, policy changes); must be quick.
        self.step_hooks: list = []

    @property
    def is_running(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self.error is None
            and self.engine.dead is None
        )

    @property
    def is_dead(self) -> bool:
        """The engine is unusable, or its loop was started and has ended other than by `shutdown`: nothing
        will be served any more (liveness). Not dead before `start`."""
        if self.error is not None or self.engine.dead is not None:
            return True
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="drift-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> EngineStats:
        """Snapshot taken by the engine thread after its last step (never blocks on the model)."""
        return self._stats

    def call_in_engine_thread(self, fn) -> None:
        """Run `fn(engine)` on the engine thread between steps (e.g. switching the policy)."""
        self._commands.put(("call", fn))

    # ---- requests -----------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | abc.Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Validate synchronously (errors raise before the first yield), then stream until finished."""
        if not self.is_running:
            raise EngineDeadError(
                f"engine is not running: {self.error!r}" if self.error else "engine not started"
            )
        request_id = request_id or uuid.uuid4().hex
        seq = self.engine.make_sequence(request_id, prompt, params, slo, arrival_time)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            # Checked again under the lock: a loop that died meanwhile failed every stream registered
            # before it took this lock, and one registered after would wait forever.
            if self.error is not None:
                raise EngineDeadError(f"engine is not running: {self.error!r}")
            if self._stats.num_waiting + self._pending_adds >= self.max_waiting:
                raise EngineOverloadedError(f"waiting queue is full ({self.max_waiting} requests)")
            if request_id in self._streams:
                raise InvalidRequestError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
            self._pending_adds += 1
        self._commands.put(("add", seq))
        return RequestStream(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.dead is not None:  # e.g. a policy switch that failed beyond recovery
                    raise EngineDeadError(f"engine is unusable: {self.engine.dead!r}")
                if self.engine.has_unfinished_requests():
                    # Raises only when the engine is unusable: it fails single requests and batches itself.
                    outputs = self.engine.step()
                    self._stats = self.engine.stats()
                    for out in outputs:
                        self._deliver(out)
                    self._flush()
                    for hook in self.step_hooks:
                        try:
                            hook(self.engine, outputs)
                        except Exception as exc:  # an observer's bug must not stop serving; a dead GPU does
                            if is_fatal_error(exc):
                                raise
                            log.exception("step hook %r failed", hook)
        except BaseException as exc:  # the loop must never die silently: fail every open request
            log.exception("engine loop died")
            self.error = exc
            with self._lock:
                streams = list(self._streams.values())
                self._streams.clear()
            for stream in streams:  # after what the dead step already produced
                self._post(stream, EngineDeadError(f"engine loop died: {exc!r}"))
            self._flush()

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd, arg = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._handle(cmd, arg)
            except Exception as exc:
                if is_fatal_error(exc):
                    raise
                log.exception("engine command %r failed", cmd)
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                break
        self._flush()
        self._stats = self.engine.stats()

    def _handle(self, cmd: str, arg: object) -> None:
        if cmd == "add":
            seq = arg
            assert isinstance(seq, Sequence)
            with self._lock:
                self._pending_adds -= 1
                stream = self._streams.get(seq.request_id)
            if stream is None:  # cancelled before it reached the engine
                return
            try:
                self.engine.add_sequence(seq)
            except Exception as exc:
                with self._lock:
                    self._streams.pop(seq.request_id, None)
                self._post(stream, exc)
        elif cmd == "abort":
            # The stream stays registered until the final 'abort' output reaches it (now, or when the
            # request's running batch returns), so nobody waiting on it hangs.
            out = self.engine.abort_request(str(arg))
            if out is not None:
                self._deliver(out)
        elif cmd == "call":
            arg(self.engine)  # type: ignore[operator]

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            # A failed request raises its error to the consumer (the server maps it to an error response).
            self._post(stream, out if out.error is None else out.error)

    def _post(self, stream: _Stream, item: Item) -> None:
        self._outbox.setdefault(stream.loop, []).append((stream.queue, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is left to read these
                loop.call_soon_threadsafe(_put_all, items)

"""One agent as the routing policies see it, and the pool of agents the router polls.

A `Backend` implements `routing.view.InstanceView` from the agent's last `GET /state` plus what the router sent
it since that poll was issued (optimistic updates): every request sent adds its estimated prompt tokens to the
pending prefill and one sequence to the running batch, so a burst of requests between two polls spreads
instead of piling onto the backend that looked idle. A poll issued after a request was sent already counts it
(the agent has it), so the poll's figures replace the estimate.

Prompt tokens are estimated without a tokenizer (the router has none): 4 characters per token of text, the
length of token-id prompts, plus a few tokens per chat message for its template.

Without performance figures in `/state` (`perf.prefill_s_per_token`, `perf.decode_step_s`: null until the agent
has measured them), the predictions `slo-aware` reads fall back to `DEFAULT_PREFILL_S_PER_TOKEN` and
`DEFAULT_DECODE_STEP_S`: the same for every backend, so the choice then follows queued work, as least-loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

DEFAULT_PREFILL_S_PER_TOKEN = 1e-4  # ~10k prompt tokens/s: a mid-size model on one GPU
DEFAULT_DECODE_STEP_S = 0.02
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role markers and separators a chat template adds around each message


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of an OpenAI request without a tokenizer: chars / 4 of text, the count of token ids."""
    chars = 0
    tokens = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            tokens += len(prompt)
        else:  # a batch: strings or token lists
            for p in prompt:
                if isinstance(p, str):
                    chars += len(p)
                elif isinstance(p, list):
                    tokens += len(p)
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            tokens += TOKENS_PER_MESSAGE
            content = m.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
    return max(1, tokens + -(-chars // CHARS_PER_TOKEN))


def _int(d: dict[str, Any], key: str, default: int = 0) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _pos_float(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def _fraction(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 else None


@dataclass(frozen=True, slots=True)
class AgentState:
    """The fields of an agent's `GET /state` the router uses (missing or mistyped numbers read as 0/None)."""

    model: str | None
    ready: bool
    draining: bool
    engine_up: bool
    waiting: int
    running: int
    pending_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_used_tokens: int
    block_size: int
    prefill_s_per_token: float | None
    decode_step_s: float | None
    decode_batch: int
    slo_attainment: float | None  # `slo.attainment`: None while the agent's window has no classified request

    @classmethod
    def from_json(cls, d: Any) -> AgentState:
        if not isinstance(d, dict):
            raise ValueError("state is not a JSON object")
        perf = d.get("perf") if isinstance(d.get("perf"), dict) else {}
        slo = d.get("slo") if isinstance(d.get("slo"), dict) else {}
        model = d.get("model")
        return cls(
            model=model if isinstance(model, str) else None,
            ready=d.get("ready") is True,
            draining=d.get("draining") is True,
            engine_up=d.get("engine_up") is True,
            waiting=_int(d, "waiting"),
            running=_int(d, "running"),
            pending_prefill_tokens=_int(d, "pending_prefill_tokens"),
            kv_blocks_total=_int(d, "kv_blocks_total"),
            kv_blocks_free=_int(d, "kv_blocks_free"),
            kv_used_tokens=_int(d, "kv_used_tokens"),
            block_size=max(1, _int(d, "block_size", 16)),
            prefill_s_per_token=_pos_float(perf, "prefill_s_per_token"),
            decode_step_s=_pos_float(perf, "decode_step_s"),
            decode_batch=max(1, _int(perf, "decode_batch", 1)),
            slo_attainment=_fraction(slo, "attainment"),
        )


class Sent:
    """One request's optimistic share of a backend's load, until a poll counts it or it is refused."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens


class Backend:
    """One agent: its polled state, what was sent since, its refusal window; an `InstanceView`."""

    def __init__(self, url: str, index: int) -> None:
        self.url = url.rstrip("/")
        self._index = index
        self.state: AgentState | None = None
        self.poll_error: str | None = "not polled yet"
        self.refused_until = 0.0  # monotonic; a 429/503 with Retry-After keeps it out until then
        self.inflight = 0  # requests the router has open on it
        self.removed = False
        self._sent: deque[Sent] = deque()
        self._sent_tokens = 0

    def __repr__(self) -> str:
        return f"Backend({self.url!r}, index={self._index})"

    # ---- routability ---------------------------------------------------------------------------------------
    def unroutable_reason(self, now: float) -> str | None:
        """Why no request may go here now (a metric label), or None."""
        s = self.state
        if self.poll_error is not None or s is None:
            return "state_failed"
        if not s.engine_up:
            return "engine_down"
        if s.draining:
            return "draining"
        if not s.ready:
            return "not_ready"
        if now < self.refused_until:
            return "refused"
        return None

    def routable(self, now: float) -> bool:
        return self.unroutable_reason(now) is None

    # ---- optimistic updates --------------------------------------------------------------------------------
    def note_sent(self, tokens: int, now: float) -> Sent:
        sent = Sent(now, tokens)
        self._sent.append(sent)
        self._sent_tokens += tokens
        return sent

    def forget_sent(self, sent: Sent) -> None:
        """A request the backend refused never joined its load."""
        with contextlib.suppress(ValueError):
            self._sent.remove(sent)
            self._sent_tokens -= sent.tokens

    def apply_state(self, state: AgentState, issued_at: float) -> None:
        """A poll issued at `issued_at` already counts every request sent before it."""
        self.state = state
        self.poll_error = None
        while self._sent and self._sent[0].at <= issued_at:
            self._sent_tokens -= self._sent.popleft().tokens

    def poll_failed(self, error: str) -> None:
        self.poll_error = error

    # ---- InstanceView --------------------------------------------------------------------------------------
    @property
    def index(self) -> int:
        return self._index

    @property
    def pending_prefill_tokens(self) -> int:
        s = self.state
        return (s.pending_prefill_tokens if s else 0) + self._sent_tokens

    @property
    def kv_used_tokens(self) -> int:
        return self.state.kv_used_tokens if self.state else 0

    @property
    def load_tokens(self) -> int:
        return self.pending_prefill_tokens + self.kv_used_tokens

    @property
    def kv_usage(self) -> float:
        s = self.state
        if not s or s.kv_blocks_total <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - s.kv_blocks_free / s.kv_blocks_total))

    @property
    def num_running(self) -> int:
        return (self.state.running if self.state else 0) + len(self._sent)

    @property
    def free_kv_blocks(self) -> int:
        return self.state.kv_blocks_free if self.state else 0

    @property
    def block_size(self) -> int:
        return self.state.block_size if self.state else 16

    @property
    def slo_attainment(self) -> float | None:
        return self.state.slo_attainment if self.state else None

    def _prefill_per_token(self) -> float:
        s = self.state
        return (s.prefill_s_per_token if s else None) or DEFAULT_PREFILL_S_PER_TOKEN

    def busy_for(self, now: float) -> float:
        """The router cannot see the step in flight: half a decode step on average while anything runs."""
        return 0.5 * self.decode_step_s(self.num_running, self.kv_used_tokens) if self.num_running else 0.0

    def queued_prefill_s(self) -> float:
        return self.pending_prefill_tokens * self._prefill_per_token()

    def prefill_s(self, tokens: int) -> float:
        return tokens * self._prefill_per_token()

    def decode_step_s(self, batch: int, kv_tokens: int) -> float:
        """The agent's last measured decode step (at `perf.decode_batch` sequences), half of it scaled with the
        batch: a decode step is part weight reads (fixed) and part per-sequence work. `kv_tokens` is not used:
        `/state` gives no per-token figure."""
        s = self.state
        base = (s.decode_step_s if s else None) or DEFAULT_DECODE_STEP_S
        ref = s.decode_batch if s else 1
        return base * (0.5 + 0.5 * max(batch, 1) / ref)


class BackendPool:
    """The agents the router knows, by URL; ids are stable per URL for the router's lifetime (a backend that
    leaves and comes back keeps its id, so affinity homes stay meaningful). Each backend has a poller task
    while the pool is running."""

    def __init__(
        self,
        poll_interval_s: float,
        poll_timeout_s: float,
        on_change: Callable[[Backend, str | None, str | None], None] | None = None,
        on_removed: Callable[[Backend], None] | None = None,
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.backends: dict[str, Backend] = {}
        self.static: set[str] = set()  # `--backend` URLs: discovery never removes them
        self._ids: dict[str, int] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        # (backend, reason it was unroutable before or None, reason now or None) on every transition
        self._on_change = on_change
        self._on_removed = on_removed

    # ---- membership ----------------------------------------------------------------------------------------
    def add(self, url: str) -> Backend:
        url = url.rstrip("/")
        backend = self.backends.get(url)
        if backend is None:
            index = self._ids.setdefault(url, len(self._ids))
            backend = self.backends[url] = Backend(url, index)
            self._start_poller(backend)
        return backend

    def remove(self, url: str) -> None:
        backend = self.backends.pop(url.rstrip("/"), None)
        if backend is None:
            return
        backend.removed = True
        task = self._pollers.pop(backend.url, None)
        if task is not None:
            task.cancel()
        if self._on_removed is not None:
            self._on_removed(backend)

    def add_static(self, url: str) -> Backend:
        """A `--backend` URL: in the pool for the router's lifetime, whatever discovery says."""
        backend = self.add(url)
        self.static.add(backend.url)
        return backend

    def set_urls(self, urls: Iterable[str]) -> None:
        """Discovery's full list of ready agents: add the new ones, remove the ones gone (their requests in
        flight finish on them). Static backends stay (their own polls decide whether they are routable)."""
        wanted = {u.rstrip("/") for u in urls} | self.static
        for url in list(self.backends):
            if url not in wanted:
                self.remove(url)
        for url in sorted(wanted):
            self.add(url)

    def routable(self, now: float, model: str | None) -> list[Backend]:
        return [
            b
            for b in self.backends.values()
            if b.routable(now) and (model is None or b.state is None or b.state.model == model)
        ]

    def models(self) -> set[str]:
        """Models served by backends whose state is known (ready or not)."""
        return {b.state.model for b in self.backends.values() if b.state and b.state.model}

    # ---- polling -------------------------------------------------------------------------------------------
    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        for backend in self.backends.values():
            self._start_poller(backend)

    async def stop(self) -> None:
        tasks = list(self._pollers.values())
        self._pollers.clear()
        self._session = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_poller(self, backend: Backend) -> None:
        if self._session is not None and backend.url not in self._pollers:
            self._pollers[backend.url] = asyncio.get_running_loop().create_task(
                self._poll_loop(backend, self._session), name=f"poll {backend.url}"
            )

    async def poll_once(self, backend: Backend, session: aiohttp.ClientSession) -> None:
        issued = time.monotonic()
        state: AgentState | None = None
        error: Exception | None = None
        try:
            async with session.get(
                backend.url + "/state", timeout=aiohttp.ClientTimeout(total=self.poll_timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"GET /state answered {resp.status}")
                state = AgentState.from_json(await resp.json(content_type=None))
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ) as exc:  # any failure (refused, timeout, bad JSON) makes it unroutable until it recovers
            error = exc
        # Only what this poll changes is its transition: a refusal recorded while it was in flight is the
        # forwarder's own (and counted there).
        now = time.monotonic()
        before = backend.unroutable_reason(now)
        if state is not None:
            backend.apply_state(state, issued)
        else:
            if backend.poll_error is None:
                log.warning("backend %s: GET /state failed: %r", backend.url, error)
            backend.poll_failed(repr(error))
        after = backend.unroutable_reason(now)
        if after != before and self._on_change is not None:
            self._on_change(backend, before, after)

    async def _poll_loop(self, backend: Backend, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        while not backend.removed:
            started = loop.time()
            await self.poll_once(backend, session)
            await asyncio.sleep(max(0.0, self.poll_interval_s - (loop.time() - started)))

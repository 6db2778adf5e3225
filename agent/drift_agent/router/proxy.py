"""Forwarding one OpenAI request: choose a backend, send, retry a refusal elsewhere, relay the response.

Until the client has received its first byte a request can still go elsewhere, so a backend that refuses
(429, 503: full, draining, engine dead; its `Retry-After` keeps it out for that long), cannot be reached,
sends nothing within the first-byte timeout, or accepts a stream and breaks or stalls before its first token
(the first-token timeout), is skipped
and the request is sent to another backend, at most `max_attempts` backends in all. Nothing reaches the client
before that first token (a chat's opening role chunk is held back with it). Once the response has started
(streaming: the first token; not streaming: the whole body, which the router holds anyway to send with a
length) it is the client's: a failure mid-stream ends the client's stream the documented way, an error event
then `data: [DONE]`, never a hang or a cut.

Streams are passed through as the upstream's TCP reads arrive (no parsing, no re-framing, no buffering), and
a client that disconnects cancels the handler (aiohttp's `handler_cancellation`), which closes the upstream
connection: the agent sees the disconnect and aborts the request, freeing its KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

try:  # Python 3.11+; aiohttp brings async-timeout on 3.10
    from asyncio import timeout as _timeout
except ImportError:  # pragma: no cover
    from async_timeout import timeout as _timeout  # type: ignore[no-redef]

from ..routing.affinity import affinity_key
from ..routing.policies import PrefixAffinityRouter, Router, RouteRequest
from .backend import Backend, BackendPool, estimate_prompt_tokens
from .errors import error_response, sse_error
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 §7.6.1) are the connection's, not the request's; Host and the body framing
# are the upstream connection's own.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_NOT_RELAYED_BACK = _HOP_BY_HOP | {"server", "date"}
BACKEND_HEADER = "x-drift-backend"
_DONE = b"data: [DONE]"


def forward_headers(headers: Mapping[str, str], drop: frozenset[str] = _HOP_BY_HOP) -> CIMultiDict[str]:
    """Every header except hop-by-hop ones, Host, and those the Connection header names."""
    named = {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    items = headers.items()
    for k, v in items:
        lk = k.lower()
        if lk not in drop and lk not in named:
            out.add(k, v)
    return out


def retry_after_s(value: str | None, default: float, cap: float) -> float:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), clamped to [0, cap]; `default` if absent."""
    if not value:
        return default
    try:
        secs = float(value)
    except ValueError:
        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(secs, 0.0), cap)


def _slo_s(headers: Mapping[str, str], name: str) -> float | None:
    """A valid SLO header in seconds; the agent refuses invalid ones itself (400), the router just ignores them."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms / 1000.0 if 0 < ms < float("inf") else None


@dataclass(frozen=True)
class ProxySettings:
    max_attempts: int = 3
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 30.0  # streaming: until the agent accepts the stream (its headers)
    # Streaming: from sending the request until its first token (see `first_token_timeout`).
    first_token_timeout_s: float = 60.0
    request_timeout_s: float = 600.0  # not streaming: the whole response (its first byte is its end)
    stream_idle_timeout_s: float = 300.0  # streaming: the longest gap between two upstream reads
    default_retry_after_s: float = 1.0
    max_retry_after_s: float = 60.0


class Refused(Exception):
    """The backend answered 429/503 before any byte reached the client; the request may go elsewhere."""

    def __init__(self, status: int, body: bytes, headers: CIMultiDictProxy[str], retry_s: float) -> None:
        super().__init__(f"refused with {status}")
        self.status = status
        self.body = body
        self.headers = headers
        self.retry_s = retry_s


class Unreachable(Exception):
    """No response from the backend (connection failed, reset, or the first-byte timeout passed)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # "connect", "timeout", "first_token_timeout", "error"


class ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


class Upstream:
    """The upstream side of one response: a backend and its open HTTP response, read one chunk at a time.

    This is the seam for live migration: `StreamRelay` reads its stream only through `relay.upstream`, one
    `read_chunk()` at a time, so a migration can open the continuation of the same stream on another agent as
    a new `Upstream` and `StreamRelay.swap()` it in between two chunks; the client's connection, response
    headers and accounting stay as they are (the old upstream is closed, which aborts it on its agent).
    """

    __slots__ = ("backend", "response", "first", "_reader")

    def __init__(self, backend: Backend, response: aiohttp.ClientResponse, first: bytes = b"") -> None:
        self.backend = backend
        self.response = response
        self.first = first  # a stream's first bytes, read before the client's response started
        self._reader = response.content

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrived (b"" at the end); raises on a broken connection or the idle timeout."""
        return await self._reader.readany()

    def close(self) -> None:
        """Close the connection (not back to the pool: an unfinished body must not be reused)."""
        self.response.close()


class StreamRelay:
    """Relays an upstream SSE stream to the client as it arrives; a broken upstream ends the client's stream
    with an error event and `data: [DONE]`. See `Upstream` for swapping the upstream mid-stream."""

    def __init__(self, upstream: Upstream, out: web.StreamResponse, metrics: RouterMetrics) -> None:
        self.upstream = upstream
        self.out = out
        self.metrics = metrics
        self._tail = b""

    def swap(self, upstream: Upstream) -> None:
        """Continue the stream from `upstream` (live migration): the old one is closed."""
        old, self.upstream = self.upstream, upstream
        old.close()

    async def write(self, chunk: bytes) -> None:
        try:
            await self.out.write(chunk)
        except ConnectionError as exc:
            raise ClientGone() from exc
        self._tail = chunk[-16:] if len(chunk) >= 16 else (self._tail + chunk)[-16:]

    async def run(self) -> None:
        while True:
            upstream = self.upstream
            try:
                chunk = await upstream.read_chunk()
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else "broken"
                await self._fail(
                    upstream, reason, f"upstream {upstream.backend.url} failed mid-stream: {exc!r}"
                )
                return
            if not chunk:
                if upstream is not self.upstream:  # swapped while this read ended; go on with the new one
                    continue
                if not self._tail.rstrip().endswith(_DONE):
                    await self._fail(upstream, "truncated", "upstream ended the stream without [DONE]")
                return
            await self.write(chunk)

    async def _fail(self, upstream: Upstream, reason: str, message: str) -> None:
        log.warning("%s", message)
        upstream.close()
        self.metrics.stream_errors.labels(upstream.backend.url, reason).inc()
        # Start the error event on a line of its own even if the upstream broke in the middle of an event.
        prefix = b"" if self._tail.endswith(b"\n\n") or not self._tail else b"\n\n"
        await self.write(prefix + sse_error(502, message, code="upstream_failed"))


class Forwarder:
    """The request path: one per router, shared by every request."""

    def __init__(
        self,
        pool: BackendPool,
        policy: Router,
        session_holder: dict[str, aiohttp.ClientSession],
        metrics: RouterMetrics,
        settings: ProxySettings,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self._session_holder = session_holder
        self.metrics = metrics
        self.settings = settings
        self._uses_affinity = isinstance(policy, PrefixAffinityRouter)

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session_holder["session"]

    # ---- choosing ------------------------------------------------------------------------------------------
    def choose(self, route_req: RouteRequest, candidates: list[Backend], now: float, attempt: int) -> Backend:
        policy = self.policy
        before = (
            getattr(policy, "sticky_hits", 0),
            getattr(policy, "rehomed", 0),
            getattr(policy, "stand_ins", 0),
        )
        backend = policy.route(route_req, candidates, now)
        if attempt > 0:
            reason = "retry"
        elif getattr(policy, "stand_ins", 0) != before[2]:  # the key's home is out of rotation for now
            reason = "home_away"
        elif len(candidates) == 1:
            reason = "single"
        elif getattr(policy, "sticky_hits", 0) != before[0]:
            reason = "sticky"
        elif getattr(policy, "rehomed", 0) != before[1]:
            reason = "rehomed"
        else:
            reason = "policy"
        self.metrics.decisions.labels(self.metrics.policy, reason).inc()
        return backend

    def _refuse(self, backend: Backend, retry_s: float) -> None:
        now = time.monotonic()
        was_routable = backend.routable(now)
        backend.refused_until = max(backend.refused_until, now + retry_s)
        if was_routable and retry_s > 0:
            self.metrics.ejected.labels(backend.url, "refused").inc()

    # ---- one attempt ---------------------------------------------------------------------------------------
    async def open(
        self,
        backend: Backend,
        method: str,
        path: str,
        body: bytes,
        headers: CIMultiDict[str],
        stream: bool,
    ) -> Upstream:
        """Send the request to `backend`; return its response once its first event is in (streaming) or it
        is complete (not streaming). Raises `Refused` or `Unreachable` when the request may go elsewhere."""
        s = self.settings
        sent_at = time.monotonic()
        # Fixed, not derived from the request's TTFT target: a request merely queued behind others on a busy
        # agent would be moved (losing its place) and, after `max_attempts`, fail.
        first_token_s = s.first_token_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=s.connect_timeout_s,
            sock_read=s.stream_idle_timeout_s if stream else s.request_timeout_s,
        )
        # A stream's headers come before its first token: their wait is within the first-token deadline too.
        first_byte = min(s.first_byte_timeout_s, first_token_s) if stream else s.request_timeout_s
        resp: aiohttp.ClientResponse | None = None
        first = b""
        try:
            async with _timeout(first_byte):
                resp = await self.session.request(
                    method, backend.url + path, data=body or None, headers=headers, timeout=timeout
                )
                if not stream or resp.status != 200:
                    await resp.read()  # within the same deadline; the body then goes out with a length
            if stream and resp.status == 200:
                # The agent accepted the stream. Nothing goes to the client before its first token, so an
                # agent that dies or stalls before it (during the prefill) leaves the request free to go
                # elsewhere: closing the response aborts it on the stalled agent.
                left = max(0.0, first_token_s - (time.monotonic() - sent_at))
                try:
                    async with _timeout(left):
                        first = await _read_until_first_token(resp.content)
                except aiohttp.ServerTimeoutError as exc:  # the socket's idle timeout came first
                    resp.close()
                    raise Unreachable(
                        "timeout", f"{backend.url} silent for {s.stream_idle_timeout_s:g} s before a token"
                    ) from exc
                except asyncio.TimeoutError as exc:
                    resp.close()
                    raise Unreachable(
                        "first_token_timeout", f"no first token from {backend.url} within {first_token_s:g} s"
                    ) from exc
        except asyncio.TimeoutError as exc:
            if resp is not None:
                resp.close()
            raise Unreachable("timeout", f"no response from {backend.url} within {first_byte:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable("connect", f"cannot connect to {backend.url}: {exc}") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            if resp is not None:
                resp.close()
            raise Unreachable("error", f"{backend.url} failed before its first byte: {exc!r}") from exc
        except BaseException:  # cancelled (the client left): do not leave the upstream running
            if resp is not None:
                resp.close()
            raise
        if resp.status in (429, 503):
            data = await resp.read()  # already read above: the buffered body
            resp.release()
            retry = retry_after_s(
                resp.headers.get("Retry-After"), s.default_retry_after_s, s.max_retry_after_s
            )
            raise Refused(resp.status, data, resp.headers, retry)
        return Upstream(backend, resp, first)

    # ---- the whole request ---------------------------------------------------------------------------------
    async def forward(
        self, request: web.Request, body: bytes, payload: dict[str, Any] | None, arrival: float
    ) -> web.StreamResponse:
        """Forward `request` (its raw `body`, parsed as `payload`) to a backend with retries; relay the answer."""
        model = payload.get("model") if payload else None
        stream = bool(payload and payload.get("stream") is True)
        headers = forward_headers(request.headers)
        tokens = estimate_prompt_tokens(payload) if payload else 1
        route_req = RouteRequest(
            prompt_tokens=tokens,
            affinity_key=affinity_key(payload, request.headers) if self._uses_affinity and payload else None,
            ttft_s=_slo_s(request.headers, "x-slo-ttft-ms"),
            tpot_s=_slo_s(request.headers, "x-slo-tpot-ms"),
        )
        tried: set[int] = set()
        last: Refused | Unreachable | None = None
        m = self.metrics
        for attempt in range(self.settings.max_attempts):
            now = time.monotonic()
            candidates = [b for b in self.pool.routable(now, model) if b.index not in tried]
            if not candidates:
                break
            backend = self.choose(route_req, candidates, now, attempt)
            tried.add(backend.index)
            sent = backend.note_sent(tokens, now)
            backend.inflight += 1
            try:
                try:
                    upstream = await self.open(backend, request.method, request.path, body, headers, stream)
                except Refused as exc:
                    backend.forget_sent(sent)
                    self._refuse(backend, exc.retry_s)
                    m.requests.labels(backend.url, str(exc.status)).inc()
                    m.retries.labels(backend.url, str(exc.status)).inc()
                    last = exc
                    continue
                except Unreachable as exc:
                    backend.forget_sent(sent)
                    log.warning("%s", exc)
                    if exc.reason == "connect":  # down: keep it out until a poll finds it again
                        backend.poll_failed(str(exc))
                        m.ejected.labels(backend.url, "state_failed").inc()
                    m.requests.labels(backend.url, "error").inc()
                    m.retries.labels(backend.url, exc.reason).inc()
                    last = exc
                    continue
                m.requests.labels(backend.url, str(upstream.response.status)).inc()
                return await self._respond(request, upstream, stream, arrival)
            finally:
                backend.inflight -= 1
        return self._give_up(last, bool(tried))

    def _give_up(self, last: Refused | Unreachable | None, tried: bool) -> web.StreamResponse:
        """Every attempt failed, or no backend could take the request at all."""
        if isinstance(last, Refused):  # the agents' own answer (OpenAI-shaped, with its Retry-After)
            headers = forward_headers(last.headers, _NOT_RELAYED_BACK)
            retry = max(1, round(last.retry_s))
            headers["Retry-After"] = str(retry)
            return web.Response(status=last.status, body=last.body, headers=headers)
        if isinstance(last, Unreachable):
            status, code = (
                (504, "upstream_timeout")
                if last.reason in ("timeout", "first_token_timeout")
                else (502, "upstream_unavailable")
            )
            self.metrics.client_errors.labels(str(status), code).inc()
            return error_response(status, f"no backend answered: {last}", code=code)
        if not tried:
            self.metrics.decisions.labels(self.metrics.policy, "no_backend").inc()
        retry = max(1, round(self.settings.default_retry_after_s))
        self.metrics.client_errors.labels("503", "no_ready_backend").inc()
        return error_response(
            503, "no ready backend", code="no_ready_backend", headers={"Retry-After": str(retry)}
        )

    async def _respond(
        self, request: web.Request, upstream: Upstream, stream: bool, arrival: float
    ) -> web.StreamResponse:
        resp = upstream.response
        headers = forward_headers(resp.headers, _NOT_RELAYED_BACK)
        headers[BACKEND_HEADER] = upstream.backend.url
        if not stream or resp.status != 200:
            body = await resp.read()  # already read in open(): returns the buffered body
            resp.release()
            return web.Response(status=resp.status, body=body, headers=headers)
        out = web.StreamResponse(status=resp.status, headers=headers)
        relay = StreamRelay(upstream, out, self.metrics)
        try:
            try:
                await out.prepare(request)
            except ConnectionError as exc:
                raise ClientGone() from exc
            self.metrics.ttft.labels(upstream.backend.url).observe(time.monotonic() - arrival)
            await relay.write(upstream.first)
            await relay.run()
            await out.write_eof()
        except (
            ClientGone,
            ConnectionError,
        ):  # the client went away: closing the upstream aborts the request on the agent
            pass
        finally:
            relay.upstream.close()
        return out


async def _read_until_first_token(content: aiohttp.StreamReader) -> bytes:
    """A stream's first bytes, up to and including its first event that is more than a chat's opening (the
    `{"role": "assistant", "content": ""}` delta the agent sends before any token). Raises when the connection
    breaks or the stream ends empty; a stream that ends cleanly after openings only is relayed as it is."""
    buf = b""
    while True:
        more = await content.readany()
        if not more:
            if buf:
                return buf
            raise aiohttp.ClientPayloadError("the stream ended before any event")
        buf += more
        if not _only_openings(buf):
            return buf


def _only_openings(buf: bytes) -> bool:
    """Whether `buf` holds nothing but chat openings, the last event possibly still incomplete."""
    *events, _incomplete = buf.split(b"\n\n")
    for event in events:
        data = event.strip().removeprefix(b"data:").strip()
        try:
            chunk = json.loads(data)
            choices = chunk["choices"]
            opening = bool(choices) and all(
                c.get("finish_reason") is None
                and set(c.get("delta", {})) <= {"role", "content"}
                and not c["delta"].get("content")
                and c["delta"].get("role")
                for c in choices
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return False  # not an opening (an error event, [DONE], a completion chunk): pass it on
        if not opening:
            return False
    return True  # only openings so far, or the first event is still incomplete


def parse_json_body(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(payload, None) or (None, error message) for a generation request's body."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"request body is not valid JSON: {exc}"
    if not isinstance(payload, dict):
        return None, "request body must be a JSON object"
    return payload, None

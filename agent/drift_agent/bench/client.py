"""Streaming client for any OpenAI-compatible server (/v1/completions or /v1/chat/completions).

Each request streams with `stream_options.include_usage` so the server's own token counts are used (falling back
to counting token chunks), asks for exactly `output_len` tokens (`max_tokens`, plus `ignore_eos` and
`min_tokens` when ignore_eos is on; servers that do not know them ignore or reject them, see --no-ignore-eos),
and carries the SLO as `x-slo-ttft-ms` / `x-slo-tpot-ms` headers, which `drift serve` schedules by and other
servers ignore. Timing follows vLLM's request functions: a token event is a streamed chunk with a choice;
one deviation: chunks that carry no text and only announce the role or the finish reason are not token events,
so a server that sends its role chunk before prefill finishes does not get a flattering TTFT. Errors are recorded
in the request's record, never raised.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from . import ServerUnreachableError
from .metrics import GoodputTargets, RequestRecord

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    endpoint: Endpoint = "completions"
    model: str = ""
    ignore_eos: bool = True
    slo: GoodputTargets | None = None
    temperature: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    request_timeout_s: float = 600.0
    max_connections: int | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]


class SSEDecoder:
    """Server-sent events from text lines: returns an event's data when its blank terminator line arrives."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        if line.startswith(":"):  # comment / keep-alive ping
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines split at "\\n" only: httpx's aiter_lines also splits at U+2028, U+0085 and others,
    which servers may send raw inside an event's JSON."""
    buf = ""
    async for text in resp.aiter_text():
        *lines, buf = (buf + text).split("\n")
        for line in lines:
            yield line
    if buf:
        yield buf


def _chunk_text(choice: dict[str, Any], endpoint: str) -> tuple[str, bool]:
    """The chunk's text and whether it is a token event (see the module docstring)."""
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or ""
        announcement = "role" in delta or choice.get("finish_reason") is not None
    else:
        text = choice.get("text") or ""
        announcement = choice.get("finish_reason") is not None
    return text, bool(text) or not announcement


class OpenAIClient:
    """One httpx connection pool, shared by every request of a benchmark."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        limits = httpx.Limits(
            max_connections=config.max_connections, max_keepalive_connections=config.max_connections
        )
        timeout = httpx.Timeout(connect=10.0, read=config.request_timeout_s, write=60.0, pool=None)
        # trust_env=False: an HTTP(S)_PROXY in the environment must not sit between client and server.
        self.http = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def _headers(self, request_id: str) -> dict[str, str]:
        h = {"x-request-id": request_id}
        if self.config.api_key:
            h["Authorization"] = f"Bearer {self.config.api_key}"
        if self.config.slo:
            h |= self.config.slo.headers()
        return h

    def build_body(self, prompt: str | list[dict[str, str]], output_len: int) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model, "stream": True, "stream_options": {"include_usage": True}}
        if c.endpoint == "chat":
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            body |= {"messages": messages, "max_completion_tokens": output_len, "max_tokens": output_len}
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            body |= {"prompt": text, "max_tokens": output_len}
        if c.ignore_eos:
            body |= {"ignore_eos": True, "min_tokens": output_len}
        if c.temperature is not None:
            body["temperature"] = c.temperature
        return body | c.extra_body

    async def list_models(self) -> list[str]:
        """Model ids from /v1/models; raises ServerUnreachableError when the server cannot be reached."""
        url = self.config.base_url.rstrip("/") + "/v1/models"
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            resp = await self.http.get(url, headers=headers)
        except httpx.HTTPError as e:
            raise ServerUnreachableError(
                f"cannot reach {self.config.base_url}: {type(e).__name__}: {e}"
            ) from e
        if resp.status_code != 200:
            raise ServerUnreachableError(f"GET {url} returned HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return [m["id"] for m in resp.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ServerUnreachableError(f"GET {url} did not return an OpenAI model list: {e}") from e

    async def send(
        self,
        record: RequestRecord,
        prompt: str | list[dict[str, str]],
        output_len: int,
        t0: float = 0.0,
    ) -> RequestRecord:
        """Stream one request and fill `record` (times relative to the perf_counter value t0)."""
        body = self.build_body(prompt, output_len)
        endpoint = self.config.endpoint
        st = time.perf_counter()
        record.start_time = st - t0
        last = st
        events = 0
        usage_out: int | None = None
        text_parts: list[str] = []
        try:
            async with self.http.stream(
                "POST", self.config.url, json=body, headers=self._headers(record.request_id)
            ) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", "replace").strip().replace("\n", " ")
                    record.error = f"HTTP {resp.status_code}: {detail[:300]}"
                    return record
                decoder = SSEDecoder()
                async for line in sse_lines(resp):
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    now = time.perf_counter()
                    if data.strip() == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.error = f"server error in stream: {json.dumps(chunk['error'])[:300]}"
                        return record
                    if choices := chunk.get("choices"):
                        text, is_token = _chunk_text(choices[0], endpoint)
                        text_parts.append(text)
                        if is_token:
                            if events == 0:
                                record.ttft = now - st
                            else:
                                record.itl.append(now - last)
                            last = now
                            events += 1
                    if usage := chunk.get("usage"):
                        usage_out = usage.get("completion_tokens", usage_out)
                        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
        except Exception as e:  # any transport or protocol failure belongs in the record, not the benchmark
            record.error = f"{type(e).__name__}: {e}"
            return record
        record.generated_text = "".join(text_parts)
        if events == 0:
            record.error = "the stream carried no token"
            return record
        record.latency = last - st
        record.output_tokens = usage_out if usage_out else events
        record.success = True
        return record

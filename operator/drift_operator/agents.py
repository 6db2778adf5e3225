"""HTTP calls to the agents: scrape /metrics, push the runtime policy with PUT /admin/policy."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from .pods import PodView


class AgentError(Exception):
    def __init__(self, pod: str, status: int, message: str) -> None:
        super().__init__(f"{pod}: {status or 'unreachable'}: {message}")
        self.pod = pod
        self.status = status
        self.message = message


class AgentClient:
    def __init__(self, timeout_s: float = 3.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"User-Agent": "drift-operator"}
            )
            self._session_loop = loop
        return self._session

    async def scrape(self, pod: PodView) -> str:
        try:
            async with self.session().get(f"{pod.base_url}/metrics") as response:
                text = await response.text()
                if response.status != 200:
                    raise AgentError(pod.name, response.status, text[:200])
                return text
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AgentError(pod.name, 0, str(exc) or type(exc).__name__) from exc

    async def push_policy(self, pod: PodView, token: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with self.session().put(
                f"{pod.admin_url}/admin/policy", json=body, headers=headers
            ) as response:
                if response.status != 200:
                    raise AgentError(pod.name, response.status, (await response.text())[:300])
                result = await response.json(content_type=None)
                return result if isinstance(result, dict) else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise AgentError(pod.name, 0, str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            with contextlib.suppress(RuntimeError):
                await self._session.close()
        self._session = None

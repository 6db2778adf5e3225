"""A small async Kubernetes API client for the children (dicts in, dicts out).

kopf talks to the API server for the LLMService itself; this client does the rest (Deployments, Services,
...) over the same credentials, which the operator's login handler loads once and hands to both.
Credentials come from the in-cluster service account, else from $KUBECONFIG / ~/.kube/config, read with
the `kubernetes` package's loaders (exec plugins, OIDC and client certificates included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class KubeCredentials:
    server: str
    token: str | None = None
    scheme: str | None = None
    username: str | None = None
    password: str | None = None
    ca_path: str | None = None
    insecure: bool = False
    cert_path: str | None = None
    key_path: str | None = None


def load_credentials() -> KubeCredentials:
    """In-cluster service account first, then the kubeconfig named by $KUBECONFIG (read at call time)."""
    import kubernetes.client
    import kubernetes.config

    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    # Newer clients keep the bearer token under 'BearerToken', older ones under 'authorization'.
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return KubeCredentials(
        server=config.host,
        token=token,
        scheme=scheme,
        username=config.username or None,
        password=config.password or None,
        ca_path=config.ssl_ca_cert or None,
        insecure=not config.verify_ssl,
        cert_path=config.cert_file or None,
        key_path=config.key_file or None,
    )


def api_base(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


def object_path(
    api_version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    path = api_base(api_version)
    if namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    def __init__(
        self,
        credentials: KubeCredentials | None = None,
        timeout_s: float = 15.0,
        reload: Callable[[], KubeCredentials] | None = load_credentials,
    ) -> None:
        # `reload` re-reads credentials after a 401: service-account tokens and exec-plugin tokens expire.
        self._reload = reload
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    @property
    def credentials(self) -> KubeCredentials | None:
        return self._credentials

    async def set_credentials(self, credentials: KubeCredentials) -> None:
        if credentials != self._credentials:
            self._credentials = credentials
            await self.close()  # the next request opens a session with the new TLS/auth settings

    def _ssl(self, creds: KubeCredentials) -> ssl.SSLContext | bool:
        if not creds.server.startswith("https"):
            return False
        context = (
            ssl.create_default_context(cafile=creds.ca_path)
            if creds.ca_path
            else ssl.create_default_context()
        )
        if creds.cert_path and creds.key_path:
            context.load_cert_chain(creds.cert_path, creds.key_path)
        if creds.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _headers(self, creds: KubeCredentials) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "drift-operator"}
        if creds.token:
            headers["Authorization"] = f"{creds.scheme or 'Bearer'} {creds.token}"
        elif creds.username and creds.password:
            headers["Authorization"] = aiohttp.BasicAuth(creds.username, creds.password).encode()
        return headers

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._credentials is None:
            raise KubeApiError(0, "NoCredentials", "the operator has not logged in to the API server yet")
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            creds = self._credentials
            connector = aiohttp.TCPConnector(ssl=self._ssl(creds))
            self._session = aiohttp.ClientSession(
                base_url=creds.server.rstrip("/") + "/",
                headers=self._headers(creds),
                timeout=self._timeout,
                connector=connector,
            )
            self._session_loop = loop
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One API call; None for 404, KubeApiError for any other failure."""
        try:
            return await self._request_once(method, path, body=body, params=params, content_type=content_type)
        except KubeApiError as exc:
            if exc.status != 401 or self._reload is None:
                raise
            try:
                fresh = await asyncio.to_thread(self._reload)
            except Exception:  # the loaders raise assorted types; the 401 is the error to report
                raise exc from None
            await self.set_credentials(fresh)
            return await self._request_once(method, path, body=body, params=params, content_type=content_type)

    async def _request_once(
        self, method: str, path: str, *, body: Any, params: dict[str, str] | None, content_type: str
    ) -> dict[str, Any] | None:
        session = await self._get_session()
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with session.request(
                method, path.lstrip("/"), json=body, params=params, headers=headers
            ) as response:
                if response.status == 404 and method == "GET":
                    return None
                payload: Any
                try:
                    payload = await response.json(content_type=None)
                except (aiohttp.ContentTypeError, ValueError):
                    payload = {"message": (await response.text())[:300]}
                if response.status >= 400:
                    payload = payload if isinstance(payload, dict) else {}
                    raise KubeApiError(
                        response.status,
                        str(payload.get("reason") or response.reason or "Error"),
                        str(payload.get("message") or ""),
                    )
                return payload if isinstance(payload, dict) else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise KubeApiError(0, type(exc).__name__, str(exc) or "connection failed") from exc

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.request("GET", path)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body) or body

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", path, params=params)
        return list((result or {}).get("items") or [])

    async def served_resources(self, group_version: str) -> set[str]:
        """Plural names served under a group/version; empty when the API group does not exist."""
        try:
            result = await self.get(api_base(group_version))
        except KubeApiError:
            return set()
        return {str(r.get("name")) for r in (result or {}).get("resources") or [] if r.get("name")}

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            # RuntimeError: the loop it was made in is gone; nothing is left to release.
            with contextlib.suppress(RuntimeError):
                await self._session.close()
        self._session = None

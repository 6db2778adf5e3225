"""API-key authentication of the OpenAI routes (`--api-key`, `DRIFT_API_KEY`), as vLLM's `--api-key`.

Protected: everything under /v1/ (as vLLM), and /tokenize and /detokenize, which vLLM leaves open but which
here share the single tokenizer thread with generation, so an anonymous client could hold it up. Open: the
probes and scrapes a cluster needs without a key (/health, /ready, /ping, /version, /metrics, /state, which
`drift router` polls) and the OpenAPI document. /admin/* keeps its own token (DRIFT_ADMIN_TOKEN).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse

from .errors import error_body

PROTECTED_PREFIXES: tuple[str, ...] = ("/v1/",)
PROTECTED_PATHS: frozenset[str] = frozenset({"/v1", "/tokenize", "/detokenize"})


def is_protected(path: str) -> bool:
    return path in PROTECTED_PATHS or path.startswith(PROTECTED_PREFIXES)


# Where the middleware leaves the index of the key a request authenticated with (`request.state`), the
# client id of fair scheduling: the index, never the key, so neither logs nor metric labels carry a secret.
API_KEY_INDEX = "drift_api_key_index"


def key_index(presented: bytes, keys: Iterable[bytes]) -> int | None:
    """The index of the key `presented` matches. Constant time in the key's content, and every key is
    compared, so timing tells neither how much of a key was right nor which key matched."""
    index = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(presented, key) and index is None:
            index = i
    return index


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


class APIKeyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): streamed responses pass through untouched, and a refused request
    is answered before its body is read."""

    def __init__(self, app: Any, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = tuple(k.encode("utf-8") for k in keys)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # OPTIONS is let through, as vLLM does: CORS preflights carry no credentials.
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        token = bearer_token(headers.get(b"authorization"))
        index = key_index(token, self.keys) if token is not None else None
        if index is not None:
            scope.setdefault("state", {})[API_KEY_INDEX] = index
            await self.app(scope, receive, send)
            return
        message = (
            "You didn't provide an API key: send it as `Authorization: Bearer <key>`"
            if token is None
            else "Incorrect API key provided"
        )
        response = JSONResponse(
            error_body(401, message, code="invalid_api_key"), 401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)

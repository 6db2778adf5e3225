"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`, as `drift serve` sends them
(`server/errors.py`; not imported here, it is FastAPI's side)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

# OpenAI's error `type` per HTTP status (the agent's table, plus the gateway statuses only the router sends).
_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "api_error",
    503: "service_unavailable_error",
    504: "api_error",
}


def _printable(text: str | None) -> str | None:
    """A message may quote client input; a lone surrogate in it would make the error response itself fail."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": _printable(message),
            "type": _TYPES.get(status, "api_error"),
            "param": _printable(param),
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, param, code)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error(status: int, message: str, code: str | None = None) -> bytes:
    """An error event and the end of the stream, as the agent ends a stream that failed mid-way."""
    return b"data: " + json.dumps(error_body(status, message, code=code)).encode() + b"\n\ndata: [DONE]\n\n"

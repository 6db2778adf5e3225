"""OpenAI-shaped error responses and stream-ending error events of the router (the body is
`core.errors.error_body`, the one `drift serve` sends)."""

from __future__ import annotations

import json

from aiohttp import web

from ..core.errors import error_body


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

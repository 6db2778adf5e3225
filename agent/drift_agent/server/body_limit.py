"""Request body size limit (`--max-request-body-bytes`): an ASGI middleware in front of every route.

A body declared larger than the limit (Content-Length) is refused with 413 at once, before the app runs, so
nothing is read, parsed or tokenized. A body without Content-Length (chunked) is counted as the app reads
it, and reading stops with 413 once it passes the limit. Either way the response is OpenAI's error shape.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response


def _too_large(limit: int) -> str:
    return f"request body is larger than {limit} bytes (--max-request-body-bytes)"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(APIError(413, _too_large(self.max_bytes)))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException reaches the app's handler (errors.py) wherever the body is read,
                    # FastAPI's own parsing included, and becomes the OpenAI-shaped 413.
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)

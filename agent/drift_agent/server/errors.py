"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`, and the app's exception handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    error_body,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the API reports as is: status, message and OpenAI's optional `param` / `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


# ---- OpenAPI ---------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every 4xx and 5xx."""

    error: ErrorInfo


_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: malformed JSON, wrong types or values (`param` names the field), prompt too long "
    "(`code: context_length_exceeded`)",
    401: "Missing bearer token",
    403: "Wrong admin token, or run-time changes disabled (no admin token configured)",
    404: "Unknown model (`code: model_not_found`)",
    413: "Request body larger than --max-request-body-bytes",
    422: "Invalid values; nothing changed",
    429: "Waiting queue full (`code: overloaded`); retry after `Retry-After` seconds",
    500: "The engine failed this request",
    503: "Draining for shutdown (`code: draining`) or engine loop dead (`code: engine_dead`)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` documenting the error statuses a route really returns, with the error schema."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers
    )


def from_engine_error(
    exc: BaseException, retry_after_s: int = 1, *, prompt_param: str = "prompt", param: str | None = None
) -> APIError:
    """Map an engine exception to the status a client should see. `prompt_param` names the field that held
    the prompt (`messages` in chat); `param`, the field an invalid request was refused for, where known."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=param)
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429, f"server overloaded: {exc}", code="overloaded", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, (EngineDeadError, ModelLoadError)):
        return APIError(503, f"engine unavailable: {exc}", code="engine_dead")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts: list[str] = []
    param: str | None = None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
            continue
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'request body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request", param


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Like vLLM: a malformed OpenAI request is a 400, not FastAPI's default 422.
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route whose path matched; a path served by
            # several routes (GET and PUT /admin/policy) allows all of theirs, as the OpenAPI document says.
            operations = request.app.openapi()["paths"].get(request.url.path, {})
            methods = sorted(m.upper() for m in operations if m in _HTTP_METHODS)
            if methods:
                headers["Allow"] = ", ".join(methods)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(from_engine_error(exc))

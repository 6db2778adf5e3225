"""Typed errors the engine raises; the server maps each to an HTTP status."""

from __future__ import annotations

import sys
from typing import Any


class DriftError(Exception):
    """Base of every error Drift raises on purpose."""


class InvalidRequestError(DriftError, ValueError):
    """The request itself is malformed (empty prompt, bad sampling value, max_tokens <= 0)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context window, or can never fit in the KV pool."""


class EngineOverloadedError(DriftError):
    """The waiting queue is full; retry later."""


class EngineDeadError(DriftError):
    """The engine loop has died; no request can be served."""


class RequestFailedError(DriftError):
    """One request failed inside the engine (its own work, or the step that ran it) while the engine went on
    serving the others. The original exception is the `__cause__`."""


class ModelLoadError(DriftError):
    """The model directory is missing, unreadable or of an unsupported architecture."""


def is_fatal_error(exc: BaseException) -> bool:
    """Whether `exc` leaves the engine unusable, so it must stop instead of failing one batch and going on.

    A CUDA error (not an out-of-memory error, which fails one allocation) poisons the device context: every
    later kernel fails too. `EngineDeadError` is the engine declaring itself dead or inconsistent. Causes are
    followed, since a lane's worker thread or a wrapper may re-raise the device's error.
    """
    torch = sys.modules.get("torch")  # not imported: no torch error can exist (the pure simulator)
    device_errors: tuple[type[BaseException], ...] = ()
    if torch is not None:
        device_errors = tuple(
            t
            for t in (getattr(torch, "AcceleratorError", None), getattr(torch.cuda, "CudaError", None))
            if isinstance(t, type)
        )
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (EngineDeadError, *device_errors)):
            return True
        if isinstance(err, RuntimeError) and "CUDA error" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


# OpenAI's error `type` per HTTP status, for `drift serve` and `drift router` alike.
OPENAI_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
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
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return {
        "error": {
            "message": _printable(message),
            "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
            "param": _printable(param),
            "code": code,
        }
    }

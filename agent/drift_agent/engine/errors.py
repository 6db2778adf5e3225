"""Typed errors the engine raises; the server maps each to an HTTP status."""

from __future__ import annotations


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


class ModelLoadError(DriftError):
    """The model directory is missing, unreadable or of an unsupported architecture."""

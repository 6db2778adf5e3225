"""Server options that are not engine options (the engine's live in `EngineConfig`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# Environment variables read for server options; flags override them.
ENV_VARS: dict[str, str] = {
    "admin_token": "DRIFT_ADMIN_TOKEN",
    "api_keys": "DRIFT_API_KEY",
    "slo_window_s": "DRIFT_SLO_WINDOW_S",
    "shutdown_timeout_s": "DRIFT_SHUTDOWN_TIMEOUT_S",
    "max_request_body_bytes": "DRIFT_MAX_REQUEST_BODY_BYTES",
    "admin_port": "DRIFT_ADMIN_PORT",
    "allow_client_priority": "DRIFT_ALLOW_CLIENT_PRIORITY",
}

# What SIGTERM may take beyond the drain deadline: the aborted responses' last chunks (`InFlight.drain`'s
# flush) and uvicorn's own graceful shutdown. A pod's terminationGracePeriodSeconds must cover the sum.
DRAIN_FLUSH_S = 5.0
UVICORN_GRACEFUL_S = 5.0

# Bodies past this are refused with 413 before they are read: a few prompts of the largest context windows fit.
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token for PUT /admin/policy; None disables run-time changes altogether.
    admin_token: SecretStr | None = None
    slo_window_s: float = Field(60.0, gt=0, description="sliding window of the SLO attainment gauges")
    shutdown_timeout_s: float = Field(
        20.0, ge=0, description="how long SIGTERM waits for running requests before aborting them"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 429 (overloaded) and 503 (draining)")
    admin_timeout_s: float = Field(10.0, gt=0, description="how long PUT /admin/policy waits for the engine")
    max_request_body_bytes: int = Field(
        DEFAULT_MAX_REQUEST_BODY_BYTES, ge=1, description="larger request bodies get 413 without being read"
    )
    # The server's chat template (the text, not a path); None: the tokenizer's own.
    chat_template: str | None = None
    # A template in a request is code run by the server; only honoured when the operator opted in (vLLM's flag).
    trust_request_chat_template: bool = False
    # The admin routes on their own port (so a NetworkPolicy can keep clients off them); None: the API's port.
    admin_port: int | None = Field(None, ge=1, le=65535)
    # Priorities ahead of the default (< 0, lower goes first) jump the queue: only where the server allows it.
    allow_client_priority: bool = False
    # How chat replies are read for tool calls (tool_calls.PARSERS, vLLM's names); None: tool_choice "auto" is
    # refused, "required" and named functions (schema-constrained) still work.
    tool_call_parser: str | None = Field(None, pattern=r"^(hermes|llama3_json|mistral)$")
    # Bearer keys of the OpenAI routes (auth.py): any one is accepted; None leaves them open, as vLLM does.
    api_keys: tuple[SecretStr, ...] | None = None
    # One INFO line per generation request (its id and sizes, never its contents), as vLLM logs requests;
    # --disable-log-requests turns them off.
    log_requests: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """`--api-key` repeated or comma-separated, DRIFT_API_KEY comma-separated; an empty key is refused
        rather than leaving the server open by accident."""
        if value is None:
            return None
        items = [value] if isinstance(value, (str, SecretStr)) else list(value)
        keys: list[str] = []
        for item in items:
            raw = item.get_secret_value() if isinstance(item, SecretStr) else str(item)
            parts = [part.strip() for part in raw.split(",")]
            if not all(parts):
                raise ValueError("an API key is empty (check for stray commas or blank values)")
            keys.extend(parts)
        return tuple(dict.fromkeys(keys))

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """DRIFT_* environment < explicit overrides (CLI flags); None overrides are ignored."""
        data: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            value = (env or {}).get(var)
            if value:
                data[field] = value
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

    @property
    def worst_case_shutdown_s(self) -> float:
        """From SIGTERM to exit at the latest: the drain deadline, the flush of aborted responses, uvicorn's
        graceful shutdown."""
        return self.shutdown_timeout_s + DRAIN_FLUSH_S + UVICORN_GRACEFUL_S

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token is not None else None

    def api_key_values(self) -> tuple[str, ...]:
        return tuple(key.get_secret_value() for key in self.api_keys or ())

"""Server options that are not engine options (the engine's live in `EngineConfig`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# Environment variables read for server options; flags override them.
ENV_VARS: dict[str, str] = {
    "admin_token": "DRIFT_ADMIN_TOKEN",
    "slo_window_s": "DRIFT_SLO_WINDOW_S",
    "shutdown_timeout_s": "DRIFT_SHUTDOWN_TIMEOUT_S",
}


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

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token is not None else None

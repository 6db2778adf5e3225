"""GET/PUT /admin/policy: the scheduling policy, partition settings and default SLO targets at run time.

PUT needs `Authorization: Bearer <DRIFT_ADMIN_TOKEN>` (401 without, 403 when wrong, 403 when the server has no
token: run-time changes are then disabled). Values are validated by `EngineConfig` on the engine thread and
the response shows the state after it was applied.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from typing import Any

from fastapi import APIRouter, Request, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..commands.engine_args import config_error_message
from ..core.config import EngineConfig, PartitionConfig
from .errors import APIError, error_responses

# Every `PartitionConfig` field, optional, so a new partition setting is settable here without a second list
# to keep in step. Only the types are checked on parsing; ranges are `EngineConfig`'s, when it is applied.
# NaN and infinity are refused here: JSON's NaN passes every range check (all comparisons are false).
PartitionUpdate = create_model(
    "PartitionUpdate",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (field.annotation | None, None) for name, field in PartitionConfig.model_fields.items()},
)


class SloUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ttft_ms: float | None = Field(None, gt=0, description="default TTFT target, ms (finite, > 0)")
    tpot_ms: float | None = Field(None, gt=0, description="default TPOT target, ms (finite, > 0)")


class PolicyUpdate(BaseModel):
    """Any subset of GET /admin/policy's shape."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = None
    partition: PartitionUpdate | None = None
    slo: SloUpdate | None = None


def policy_view(config: EngineConfig) -> dict[str, Any]:
    return {
        "policy": config.policy,
        "partition": config.partition.model_dump(),
        "slo": {"ttft_ms": config.slo_ttft_ms, "tpot_ms": config.slo_tpot_ms},
    }


def check_token(authorization: str | None, expected: str | None) -> None:
    if expected is None:
        raise APIError(
            403, "run-time changes are disabled: the server has no admin token (DRIFT_ADMIN_TOKEN)"
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(403, "invalid admin token")


def _parse_update(raw: bytes) -> PolicyUpdate:
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise APIError(422, f"request body is not valid JSON: {exc}") from None
    try:
        return PolicyUpdate.model_validate(data)
    except ValidationError as exc:
        raise APIError(422, config_error_message(exc)) from None


# Documents the bearer scheme in OpenAPI; `check_token` does the checking, with its own 401/403 rules.
_BEARER = HTTPBearer(auto_error=False, description="DRIFT_ADMIN_TOKEN")


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/admin/policy")
    async def get_policy(request: Request) -> dict[str, Any]:
        return policy_view(request.app.state.drift.async_engine.engine.config)

    # The body is read by hand (authentication comes before validation), so FastAPI is told its schema.
    @router.put(
        "/admin/policy",
        dependencies=[Security(_BEARER)],
        responses=error_responses(401, 403, 413, 422, 503),
        openapi_extra={
            "requestBody": {
                "required": False,  # an empty body changes nothing
                "content": {
                    "application/json": {
                        # $defs are moved to components.schemas with the app's other models (app.py)
                        "schema": PolicyUpdate.model_json_schema(ref_template="#/components/schemas/{model}")
                    }
                },
            }
        },
    )
    async def put_policy(request: Request) -> dict[str, Any]:
        state = request.app.state.drift
        # Authenticate before looking at the body, so an anonymous caller learns nothing from validation errors.
        check_token(request.headers.get("authorization"), state.settings.admin_token_value())
        update = _parse_update(await request.body())
        async_engine = state.async_engine
        if not async_engine.is_running:
            raise APIError(503, "engine is not running")
        kwargs: dict[str, Any] = {"policy": update.policy}
        if update.partition is not None:
            kwargs["partition"] = update.partition.model_dump(exclude_none=True)
        if update.slo is not None:
            kwargs["slo_ttft_ms"] = update.slo.ttft_ms
            kwargs["slo_tpot_ms"] = update.slo.tpot_ms
        loop = asyncio.get_running_loop()
        applied: asyncio.Future[dict[str, Any]] = loop.create_future()
        # A change is applied or not, never both: the engine thread claims it before applying, the HTTP side
        # withdraws it on timeout; whoever takes the lock first decides.
        lock = threading.Lock()
        claim = {"withdrawn": False, "started": False}

        def settle(result: dict[str, Any] | None, error: BaseException | None) -> None:
            if applied.done():
                return
            if error is not None:
                applied.set_exception(error)
            else:
                applied.set_result(result or {})

        def apply(engine: Any) -> None:  # runs on the engine thread, between steps
            with lock:
                if claim["withdrawn"]:
                    return
                claim["started"] = True
            try:
                engine.update_settings(**kwargs)
                loop.call_soon_threadsafe(settle, policy_view(engine.config), None)
            except Exception as exc:
                loop.call_soon_threadsafe(settle, None, exc)

        async_engine.call_in_engine_thread(apply)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(applied), state.settings.admin_timeout_s)
            except asyncio.TimeoutError:
                with lock:
                    claim["withdrawn"] = not claim["started"]
                if claim["withdrawn"]:
                    raise APIError(
                        503, "the engine did not take the change in time; nothing was applied"
                    ) from None
                return await applied  # it is being applied right now: report how it ended
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise APIError(422, config_error_message(exc)) from None

    return router

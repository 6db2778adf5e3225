"""GET/PUT /admin/policy: the scheduling policy, partition settings, default SLO targets, fairness and
preemption mode at run time; GET /admin/kv-cache: the KV tiers' sizes and what moved between them.

PUT needs `Authorization: Bearer <DRIFT_ADMIN_TOKEN>` (401 without, 403 when wrong, 403 when the server has no
token: run-time changes are then disabled). The body is checked against `EngineConfig`'s own types and bounds
when it is parsed, the result as a whole by `EngineConfig` on the engine thread; the response shows the state
after it was applied.
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
from pydantic.fields import FieldInfo

from ..commands.engine_args import config_error_message
from ..core.config import SLO_SETTINGS, EngineConfig, PartitionConfig, PolicyName, field_bounds
from ..core.fairness import Fairness
from ..core.preemption import PreemptionMode
from .auth import bearer_token
from .errors import APIError, error_responses


def _optional(field: FieldInfo) -> tuple[Any, Any]:
    """`field` for a partial update: None (or absent) leaves the setting as it is; a value is held to the
    field's own type and bounds."""
    return field.annotation | None, Field(None, description=field.description, **field_bounds(field))


# NaN and infinity are refused: JSON's NaN passes every range check (all comparisons are false).
_UPDATE_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)

# Every `PartitionConfig` field, optional, with its type and bounds: a new partition setting is settable here
# and validated as the engine validates it, without a second list to keep in step.
PartitionUpdate = create_model(
    "PartitionUpdate",
    __config__=_UPDATE_CONFIG,
    **{name: _optional(field) for name, field in PartitionConfig.model_fields.items()},
)

# The default targets, with `EngineConfig`'s types and bounds.
SloUpdate = create_model(
    "SloUpdate",
    __config__=_UPDATE_CONFIG,
    **{name: _optional(EngineConfig.model_fields[key]) for name, key in SLO_SETTINGS.items()},
)


class PolicyUpdate(BaseModel):
    """Any subset of GET /admin/policy's shape."""

    model_config = ConfigDict(extra="forbid")
    policy: PolicyName | None = None
    partition: PartitionUpdate | None = None
    slo: SloUpdate | None = None
    fairness: Fairness | None = None
    preemption_mode: PreemptionMode | None = None

    def engine_settings(self) -> dict[str, Any]:
        """The change as `LLMEngine.update_settings` keywords (EngineConfig's names; None: unchanged)."""
        settings: dict[str, Any] = {
            "policy": self.policy,
            "fairness": self.fairness,
            "preemption_mode": self.preemption_mode,
        }
        if self.partition is not None:
            settings["partition"] = self.partition.model_dump(exclude_none=True)
        if self.slo is not None:
            settings |= {key: getattr(self.slo, name) for name, key in SLO_SETTINGS.items()}
        return settings


def policy_view(config: EngineConfig) -> dict[str, Any]:
    return {
        "policy": config.policy,
        "partition": config.partition.model_dump(),
        "slo": {name: getattr(config, key) for name, key in SLO_SETTINGS.items()},
        "fairness": config.fairness,
        "preemption_mode": config.preemption_mode,
    }


def kv_cache_view(engine: Any) -> dict[str, Any]:
    """Both KV tiers' sizes and use, and what preemption and the host tier did."""
    stats = engine.stats()
    block_bytes, block_size = engine.kv_block_bytes, engine.config.block_size

    def tier(blocks: int, free: int) -> dict[str, Any]:
        return {
            "blocks": blocks,
            "free_blocks": free,
            "tokens": blocks * block_size,
            "bytes": blocks * block_bytes,
        }

    return {
        "block_size": block_size,
        "block_bytes": block_bytes,
        "device": tier(stats.num_kv_blocks, stats.num_free_kv_blocks),
        "host": tier(stats.num_host_kv_blocks, stats.num_free_host_kv_blocks),
        "preemption_mode": engine.config.preemption_mode,
        "swapped_requests": stats.num_swapped,
        "preemptions": {
            "total": stats.num_preemptions,
            "swap": stats.num_swap_preemptions,
            "fairness": stats.num_fairness_preemptions,
        },
        "recomputed_tokens": stats.recomputed_tokens,
        "prefix_cache": {
            "queries": stats.prefix_cache_queries,
            "hits": stats.prefix_cache_hits,
            "host_hits": stats.prefix_cache_host_hits,
        },
        "blocks_moved": stats.kv_blocks_moved,
        "copies": {
            direction: {
                "copies": stats.kv_copies.get(direction, 0),
                "bytes": stats.kv_copy_bytes.get(direction, 0),
                "seconds": stats.kv_copy_seconds.get(direction, 0.0),
            }
            for direction in ("out", "in")
        },
    }


def check_token(authorization: str | None, expected: str | None) -> None:
    if expected is None:
        raise APIError(
            403, "run-time changes are disabled: the server has no admin token (DRIFT_ADMIN_TOKEN)"
        )
    token = bearer_token((authorization or "").encode())
    if token is None:
        raise APIError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token, expected.encode()):
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

    @router.get("/admin/kv-cache")
    async def get_kv_cache(request: Request) -> dict[str, Any]:
        return kv_cache_view(request.app.state.drift.async_engine.engine)

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
        kwargs = update.engine_settings()
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

"""GET /state: the agent's load and settings in one small JSON document, for `drift router`, which polls every
agent 10-20 times a second to route requests (no auth, like /metrics).

Cheap by construction: answered on the event loop from the engine's stats snapshot (taken by the engine thread
after each step), the engine's configuration and the SLO window; never a round trip to the engine thread, so
it answers while a long step runs and after the engine loop died (`engine_up: false`; the queue figures then
read 0, as the /metrics gauges do, since the dead loop failed every open request).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .state import ServerState


class PrefixCacheState(BaseModel):
    enabled: bool
    queries: int  # prompt tokens looked up in the prefix cache, since start
    hits: int  # of which found cached


class PerfState(BaseModel):
    """Recent measured costs (exponentially weighted), None until measured."""

    prefill_s_per_token: float | None
    decode_step_s: float | None
    decode_batch: int  # about the batch size `decode_step_s` was measured at


class SloState(BaseModel):
    ttft_ms: float  # the default targets
    tpot_ms: float
    attainment: float | None  # share of requests classified in the window that met both; None when none were
    window_s: float


class AgentState(BaseModel):
    """The schema of GET /state (documentation only: the route builds the dict directly)."""

    model: str
    ready: bool
    draining: bool
    engine_up: bool
    waiting: int
    running: int
    pending_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_used_tokens: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_cache: PrefixCacheState
    policy: str
    split: tuple[int, int] | None  # (prefill SMs, decode SMs) of a multiplexing policy
    perf: PerfState
    slo: SloState
    time: float  # the agent's wall clock (Unix seconds) when it answered


def state_document(state: ServerState) -> dict[str, Any]:
    async_engine = state.async_engine
    stats = async_engine.stats()
    config = state.engine.config
    up = async_engine.is_running
    dead = async_engine.is_dead
    draining = state.inflight.draining
    attainment, classified = state.metrics.window.attainment(time.monotonic())["both"]
    free = stats.num_free_kv_blocks
    return {
        "model": state.model_name,
        "ready": up and not draining,
        "draining": draining,
        "engine_up": up,
        "waiting": 0 if dead else stats.num_waiting,
        "running": 0 if dead else stats.num_running,
        "pending_prefill_tokens": 0 if dead else stats.pending_prefill_tokens,
        "kv_blocks_total": stats.num_kv_blocks,
        "kv_blocks_free": free,
        "kv_used_tokens": (stats.num_kv_blocks - free) * config.block_size,
        "block_size": config.block_size,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "prefix_cache": {
            "enabled": config.enable_prefix_caching,
            "queries": stats.prefix_cache_queries,
            "hits": stats.prefix_cache_hits,
        },
        "policy": stats.policy,
        "split": list(stats.split) if stats.split is not None else None,
        "perf": {
            "prefill_s_per_token": stats.prefill_s_per_token,
            "decode_step_s": stats.decode_step_s,
            "decode_batch": stats.decode_batch,
        },
        "slo": {
            "ttft_ms": config.slo_ttft_ms,
            "tpot_ms": config.slo_tpot_ms,
            "attainment": attainment if classified else None,
            "window_s": state.metrics.window.window_s,
        },
        "time": time.time(),
    }


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/state", response_model=None, responses={200: {"model": AgentState}})
    async def agent_state(request: Request) -> JSONResponse:
        """The agent's queue, KV pool, prefix cache, policy and split, measured costs and SLO attainment,
        from the engine's last stats snapshot (cheap: polled by `drift router`)."""
        return JSONResponse(state_document(request.app.state.drift))

    return router

"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, plus vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from . import chat_template
from .chat import chat_prompt, create_chat_completion
from .completions import create_completion
from .errors import APIError, error_responses
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from .serving import OffLoopBodyRoute, check_text, encode, off_loop, state_of
from .state import ServerState


def _generation_responses(body: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """A JSON body, or with `"stream": true` an SSE stream of `chunk` objects ending with `data: [DONE]`."""
    sse_doc = (
        f"With `stream: true`: server-sent events, `data: <{chunk.__name__}>` per step, an error as "
        '`data: {"error": ...}`, then `data: [DONE]`'
    )
    return {
        200: {
            "model": body,
            "description": f"The {body.__name__}; {sse_doc}",
            "content": {"text/event-stream": {"schema": {"type": "string", "description": sse_doc}}},
        },
        # 401: --api-key and no or a wrong key; 403: a priority ahead of the default without
        # --allow-client-priority.
        **error_responses(400, 401, 403, 404, 413, 429, 500, 503),
    }


def _tokenize_prompt(state: ServerState, req: TokenizeRequest, template: str | None) -> list[int]:
    """On the tokenizer thread, as for generation."""
    if req.messages is not None:
        return chat_prompt(
            state,
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template=template,
            template_kwargs=req.chat_template_kwargs,
            max_model_len=None,  # counting a prompt longer than the window is what /tokenize is for
        )
    assert req.prompt is not None
    tokenizer = state.engine.tokenizer
    check_text(tokenizer, req.prompt, param="prompt", add_special_tokens=req.add_special_tokens)
    return encode(tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)


def build_router() -> APIRouter:
    router = APIRouter(route_class=OffLoopBodyRoute)
    router.add_api_route(
        "/v1/completions",
        create_completion,
        methods=["POST"],
        response_model=None,
        responses=_generation_responses(CompletionResponse, CompletionChunk),
    )
    router.add_api_route(
        "/v1/chat/completions",
        create_chat_completion,
        methods=["POST"],
        response_model=None,
        responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk),
    )

    @router.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> dict[str, Any]:
        state = state_of(request)
        card = ModelCard(
            id=state.model_name,
            created=int(state.started),
            root=str(state.engine.model_dir),
            max_model_len=state.engine.max_model_len,
        )
        return ModelList(data=[card]).model_dump()

    @router.post("/tokenize", responses=error_responses(400, 404, 413))
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        state = state_of(request)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        template = chat_template.request_template(
            req.chat_template, req.chat_template_kwargs, trusted=state.settings.trust_request_chat_template
        )
        ids = await off_loop(_tokenize_prompt, state, req, template)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @router.post("/detokenize", responses=error_responses(400, 404, 413))
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        state = state_of(request)
        state.check_model(req.model)
        vocab = len(state.engine.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await off_loop(state.engine.tokenizer.decode, req.tokens)}

    return router

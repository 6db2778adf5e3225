"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, plus vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from . import chat_template
from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError
from .protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from .serving import state_of


def build_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/completions", create_completion, methods=["POST"], response_model=None)
    router.add_api_route(
        "/v1/chat/completions", create_chat_completion, methods=["POST"], response_model=None
    )

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        state = state_of(request)
        card = ModelCard(
            id=state.model_name,
            created=int(state.started),
            root=str(state.engine.model_dir),
            max_model_len=state.engine.max_model_len,
        )
        return ModelList(data=[card]).model_dump()

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        state = state_of(request)
        state.check_model(req.model)
        tokenizer = state.engine.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if req.messages is not None:
            text = chat_template.render(
                tokenizer, req.messages, add_generation_prompt=req.add_generation_prompt
            )
            ids = chat_template.tokenize_rendered(tokenizer, text)
        else:
            ids = list(tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        state = state_of(request)
        state.check_model(req.model)
        vocab = len(state.engine.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.engine.tokenizer.decode(req.tokens)}

    return router

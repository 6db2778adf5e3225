"""Rendering chat messages into a prompt with the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

from .errors import APIError
from .protocol import ChatMessageIn


def message_text(msg: ChatMessageIn, index: int) -> str:
    """The text of a message; content parts other than text are refused (this server is text-only)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts: list[str] = []
    for part in msg.content:
        kind = part.get("type") if isinstance(part, dict) else part.type
        if kind != "text":
            raise APIError(
                400,
                f"messages[{index}]: content part of type {kind!r} is not supported (text only)",
                param="messages",
            )
        texts.append(part["text"] if isinstance(part, dict) else part.text)
    return "".join(texts)


def render(
    tokenizer: Any,
    messages: list[ChatMessageIn],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true")
    conversation = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja TemplateError, raise_exception() in templates, bad kwargs
        raise APIError(400, f"chat template failed: {exc}", param="messages") from None


def tokenize_rendered(tokenizer: Any, text: str) -> list[int]:
    """Tokens of a rendered chat prompt: the template already wrote BOS and other special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)

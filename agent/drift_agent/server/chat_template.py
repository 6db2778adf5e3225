"""Rendering chat messages into a prompt with a chat template: the server's (`--chat-template`), else the
tokenizer's own. A template sent in a request is code the server would run, so it is refused unless the
operator started the server with `--trust-request-chat-template` (vLLM's rule)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import APIError
from .protocol import ChatMessageIn
from .tool_calls import template_messages

# vLLM's rule for `--chat-template VALUE`: an existing file is read; a value with one of these characters is
# the template itself; anything else is a path that could not be opened.
_JINJA_CHARS = "{}\n"


def load_chat_template(value: str | None) -> str | None:
    """The template text of `--chat-template` (a file or the template inline); ValueError when unusable."""
    if value is None:
        return None
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    except OSError as exc:  # unreadable file (permissions, a directory entry that vanished)
        raise ValueError(f"--chat-template: cannot read {value}: {exc.strerror or exc}") from None
    if text is None:
        if not any(c in value for c in _JINJA_CHARS):
            raise ValueError(f"--chat-template: {value!r} looks like a file path, but no such file exists")
        text = value
    try:  # a syntax error is the operator's mistake: refuse at start, not on every request
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template: invalid Jinja template: {exc} (line {exc.lineno})") from None
    return text


def request_template(
    chat_template: str | None, template_kwargs: dict[str, Any] | None, *, trusted: bool
) -> str | None:
    """The template a request carries (top-level `chat_template`, or in `chat_template_kwargs` as vLLM also
    reads it), refused with 400 unless request templates are trusted."""
    kwargs_template = (template_kwargs or {}).get("chat_template")
    if chat_template is None and kwargs_template is None:
        return None
    param = "chat_template" if chat_template is not None else "chat_template_kwargs"
    if not trusted:
        raise APIError(
            400,
            "chat templates in requests are refused: the server was not started with "
            "--trust-request-chat-template",
            param=param,
        )
    template = kwargs_template if kwargs_template is not None else chat_template
    if not isinstance(template, str):
        raise APIError(400, "chat_template must be a string", param=param)
    return template


def message_text(msg: ChatMessageIn, index: int) -> str:
    """The text of a message; content parts other than text are refused (this server is text-only)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts: list[str] = []
    for part in msg.content:
        if not isinstance(part, dict):
            texts.append(part.text)
            continue
        kind = part.get("type")
        if kind == "text":  # a text part that did not validate as one: `text` missing or not a string
            raise APIError(
                400, f"messages[{index}]: a text content part needs a string `text`", param="messages"
            )
        raise APIError(
            400,
            f"messages[{index}]: content part of type {kind!r} is not supported (text only)",
            param="messages",
        )
    return "".join(texts)


def _template_message(msg: ChatMessageIn, index: int) -> dict[str, Any]:
    """What the template sees of a message; tool-calling fields only when set, so templates that test for
    them (`message.tool_calls is defined`) see the same messages as before."""
    out: dict[str, Any] = {"role": msg.role, "content": message_text(msg, index)}
    if msg.tool_calls is not None:
        out["tool_calls"] = template_messages([{"tool_calls": msg.tool_calls}])[0]["tool_calls"]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    if msg.name is not None:
        out["name"] = msg.name
    return out


def _reserved_kwargs(tokenizer: Any) -> frozenset[str]:
    """`apply_chat_template`'s own parameters: as template variables they would change what the call does
    (tokenize=True, return_dict=True, ...) instead of reaching the template."""
    params = inspect.signature(tokenizer.apply_chat_template).parameters
    return frozenset(n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)


def render(
    tokenizer: Any,
    messages: list[ChatMessageIn],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text; `chat_template` (the request's or the server's) wins over the tokenizer's. Runs on the
    tokenizer worker thread: Jinja is plain Python, a long conversation must not hold up the event loop."""
    if not chat_template and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    if continue_final_message and add_generation_prompt:
        raise APIError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    extra = {k: v for k, v in (template_kwargs or {}).items() if k != "chat_template"}
    reserved = sorted(_reserved_kwargs(tokenizer).intersection(extra))
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {', '.join(reserved)} (parameters of the server's rendering)",
            param="chat_template_kwargs",
        )
    conversation = [_template_message(m, i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **extra,
        )
    except Exception as exc:  # jinja TemplateError, raise_exception() in templates, bad kwargs
        raise APIError(400, f"chat template failed: {exc}", param="messages") from None
    if not isinstance(text, str):
        raise APIError(400, "the chat template did not render text", param="messages")
    return text

"""OpenAI request/response bodies (plus vLLM's extra sampling parameters) as pydantic models.

Requests tolerate fields this server does not know (`user`, `metadata`, ...) the way OpenAI clients expect;
fields it knows but cannot honour are refused with a 400 by the routes rather than silently ignored. Booleans
are strict (`"stream": "yes"` is an error, as for OpenAI), and the types carry the ranges the server enforces,
so the OpenAPI document states them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; choice i of a seeded request samples with seed + i.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


def _encodable(value: str) -> str:
    """Lone surrogates (JSON "\\ud800") make it through JSON parsing but not into a tokenizer or a response."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text ({exc.reason} at position {exc.start})") from None
    return value


# Short strings checked at parse time; prompts and message contents, which can be megabytes, are checked on
# the tokenizer thread instead (see serving.encode).
Text = Annotated[str, AfterValidator(_encodable)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: StrictBool = False
    # vLLM extra: a usage object in every chunk, not only the last.
    continuous_usage_stats: StrictBool = False


class SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="with n > 1, seed + n - 1 too")
    stop: Text | list[Text] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extra parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    priority: int | None = None
    # Part of the response id and the x-request-id response header: visible ASCII only.
    request_id: str | None = Field(None, pattern=r"^[!-~]{1,256}$")
    # Structured outputs (vLLM's extras; at most one of them, or `response_format`): see docs/api.md.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    # vLLM's current spelling: {"json": schema, "regex": ..., "choice": [...], "grammar": ..., "json_object": true}
    structured_outputs: dict[str, Any] | None = None
    # Whitespace allowed around JSON's `{}[],:` (a regex), for JSON constraints only; `whitespace_pattern` in
    # `structured_outputs`. Default: none, with `, ` and `: ` separators.
    guided_whitespace_pattern: Text | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: one backend (llguidance)


def _prompt_kind(value: Any) -> str:
    """Which of the four prompt forms `value` is, from its first element: validating against one form instead
    of trying all four keeps a prompt of a million token ids cheap to parse (and its errors short)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value:
        if isinstance(value[0], str):
            return "texts"
        if isinstance(value[0], list):
            return "token_lists"
    return "tokens"


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("tokens")]
    | Annotated[list[list[int]], Tag("token_lists")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: StrictBool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = None  # json_object / json_schema, as vLLM takes on completions
    best_of: int | None = Field(None, description="at least n; greater than n is not supported")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


# The roles OpenAI and vLLM accept.
Role = Literal["system", "user", "assistant", "tool", "developer"]


class ChatMessageIn(_Request):
    role: Role
    content: str | list[TextContentPart | dict[str, Any]] | None = None
    name: Text | None = None
    # Tool calling: an assistant message's calls, and the call a `tool` message answers (to the template).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Text | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: StrictBool | None = None
    # vLLM extras for the chat template; a template in the request needs --trust-request-chat-template.
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: StrictBool = False


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------------
def now_s() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatStreamChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...} or {"tool_calls": [...]}, {} at the end
    delta: dict[str, Any]
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "drift"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

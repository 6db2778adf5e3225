"""Per-request sampling parameters (vLLM-compatible names) and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError

# The default of --max-logprobs (vLLM's, OpenAI's chat limit); the server enforces the configured one.
MAX_LOGPROBS = 20
# What torch.Generator.manual_seed accepts (an int64 or a uint64); anything else fails when the request is
# sampled, long after it was accepted.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1

StructuredKind = Literal["json", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output, enforced by token masks (engine/structured.py).

    json: any JSON object (`spec` unused); json_schema: a dict schema; regex: a pattern the whole output
    matches; choice: a list of strings, the output is one of them; grammar: a Lark (or GBNF) grammar.
    `param` names the request field it came from, so a compile error can name it in its 400.
    `whitespace_pattern` (json kinds only, vLLM's `guided_whitespace_pattern`): a regex for the whitespace
    allowed around JSON's structural characters, instead of the default compact `, ` / `: ` separators.
    """

    kind: StructuredKind
    spec: Any = None
    param: str | None = None
    whitespace_pattern: str | None = None

    def validate(self) -> None:
        """What can be checked without the tokenizer; compiling (engine/structured.py) checks the rest."""
        where = self.param or "structured"

        def bad(msg: str) -> InvalidRequestError:
            err = InvalidRequestError(f"{where}: {msg}")
            err.param = self.param  # type: ignore[attr-defined]  # read by the server's param_of
            return err

        if self.kind not in STRUCTURED_KINDS:
            raise bad(f"unknown structured output kind {self.kind!r}")
        spec = self.spec
        if self.kind == "json_schema" and not isinstance(spec, dict):
            raise bad("a JSON schema must be an object")
        if self.kind in ("regex", "grammar") and (not isinstance(spec, str) or not spec):
            raise bad(f"the {self.kind} must be a non-empty string")
        if self.whitespace_pattern is not None and (
            self.kind not in ("json", "json_schema") or not isinstance(self.whitespace_pattern, str)
        ):
            raise bad("a whitespace pattern needs a JSON constraint and must be a string")
        if self.kind == "choice" and (
            not isinstance(spec, (list, tuple))
            or not spec
            or any(not isinstance(c, str) or not c for c in spec)
        ):
            raise bad("choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0: only the chosen one)
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # output constrained by a grammar (engine/structured.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be a positive integer, got {self.n!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None:
            if not isinstance(self.seed, int):
                raise bad(f"seed must be an integer, got {self.seed!r}")
            # n > 1 fans out as n requests seeded seed, seed + 1, ..., which must all be valid seeds.
            if not MIN_SEED <= self.seed <= MAX_SEED - (self.n - 1):
                raise bad(
                    f"seed must be in [{MIN_SEED}, {MAX_SEED}]"
                    + (f" with seed + n - 1 in range too (n = {self.n})" if self.n > 1 else "")
                    + f", got {self.seed}"
                )
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers")
        # No upper bound here: --max-logprobs (the server's check) decides; the sampler caps at the vocabulary.
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad(f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise bad(f"structured must be a StructuredOutput, got {type(self.structured).__name__}")
            self.structured.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

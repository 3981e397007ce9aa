"""Request bodies the gateway accepts: OpenAI's fields, validated so bad input gets a 400.
The fields are an allow-list: anything else (vLLM's `ignore_eos`, `min_tokens`, ...) is refused
with a 400 naming it, so a client cannot reach engine knobs that make one request expensive."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tool-call bookkeeping a client replays is dropped

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Plain text of the message; image or audio parts are refused with a clear error."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Bounds on what one request may ask, so no request can hold a replica: stop strings are matched
# on every step (transformers' StopStringCriteria builds vocabulary × stop-length tables for
# them), a seed must fit the engines' 64-bit generators, and the number of messages is bounded
# (their characters are, by the body's size: FLYWHEEL_MAX_REQUEST_BYTES).
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
SEED_MAX = 2**63 - 1


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = Field(default=None, max_length=256)  # accepted, never forwarded

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None:
            if len(value) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop sequences")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
            if any(len(s) > MAX_STOP_CHARS for s in value):
                raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
        return value

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs) or self.top_logprobs is not None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def token_limit(self) -> int | None:
        return self.max_tokens

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

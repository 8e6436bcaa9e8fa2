"""OpenAI request bodies as pydantic models: one source of truth for validation and defaults.

The node validates every body with these before routing (a 400 names the bad field); the worker
re-parses the same normalized body, so defaults live in one place.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from aivailable.errors import InvalidRequest

MAX_STOP_SEQUENCES = 4


class _Strict(BaseModel):
    """Unknown fields are rejected (as OpenAI does), so a typo never silently changes behaviour."""

    model_config = ConfigDict(extra="forbid", str_max_length=4_000_000)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    # llama.cpp extensions, accepted by llama.cpp's own server too.
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None
    continue_final_message: bool = False
    """vLLM's extension: continue the final (assistant) message instead of starting a new turn. The
    router uses it to resume a stream on another replica (api/resume.py); clients may use it to prefill."""

    @field_validator("continue_final_message")
    @classmethod
    def _final_is_assistant(cls, v: bool, info: ValidationInfo) -> bool:
        messages = info.data.get("messages")
        if v and messages and messages[-1].role != "assistant":
            raise ValueError("it needs the last message to be from the assistant")
        return v

    def token_limit(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`; None = until context ends."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(union_mode="left_to_right")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: Literal[False] | None = None
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported (send one request per prompt)")
            return v[0]
        return v


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        if any(s == "" for s in items):
            raise ValueError("input strings must not be empty")
        return items


ENDPOINT_SCHEMAS: dict[str, type[BaseModel]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str:
    """`("messages", 0, "content", "str")` -> `messages[0].content` (union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or any(c in str(part) for c in "[(-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_request(kind: str, body: Any) -> BaseModel:
    """Validate a decoded JSON body; raise InvalidRequest naming the first bad field."""
    schema = ENDPOINT_SCHEMAS[kind]
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param(tuple(err["loc"])) or None
        if err["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param) from None
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = repr(got) if isinstance(got, (int, float, bool, type(None))) or (
            isinstance(got, str) and len(got) < 60) else type(got).__name__
        raise InvalidRequest(f"Invalid value for '{param}': {msg} (got {shown}).", param=param) from None

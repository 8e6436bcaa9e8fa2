"""OpenAI request bodies as pydantic models: one source of truth for validation and defaults.

The node validates every body with these before routing (`api/app.py`: a 400 names the bad field); the
worker re-parses the same normalized body (`engine/worker.py`), so defaults live in one place. The
Responses API's own request body is HTTP-front-end only (`api/responses_schema.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aivailable.errors import InvalidRequest
from aivailable.jsonschema_check import check_schema
from aivailable.keepalive import parse_duration

MAX_STOP_SEQUENCES = 4

KeepAlive = Annotated[float | None, BeforeValidator(lambda v: None if v is None else parse_duration(v),
                                                    json_schema_input_type=float | str | None)]
"""Ollama's `keep_alive`: how long the model stays loaded after this request ("5m", 300, -1 = forever)."""


class _Strict(BaseModel):
    """Unknown fields are rejected (as OpenAI does), so a typo never silently changes behaviour."""

    model_config = ConfigDict(extra="forbid", str_max_length=4_000_000)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


MAX_IMAGE_URL = 64 << 20
"""A data: URL may be as long as the node's max_body_bytes allows (an image is not a 4 MB text)."""


class ImageUrl(_Strict):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_IMAGE_URL)

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    """JSON text, as the model produced it (OpenAI sends and expects a string)."""


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    """Accepted on assistant messages a client sends back (OpenAI's own replies carry it); ignored."""

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[int]:
        """Indexes of the image parts in the content."""
        if not isinstance(self.content, list):
            return []
        return [i for i, p in enumerate(self.content) if isinstance(p, ImagePart)]


FUNCTION_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


class FunctionDef(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, v: JsonSchemaFormat | None) -> JsonSchemaFormat | None:
        if v is not None and v.schema_ is not None:
            check_schema(v.schema_)
        return v


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
MAX_N = 16
"""Choices per request; each is a sequence of its own on the replica (see engine/worker.py)."""
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
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # Accepted for compatibility and ignored (documented in the README): this server stores nothing,
    # has one service tier and produces text only.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    keep_alive: KeepAlive = None
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


class Prediction(_Strict):
    type: Literal["content"]
    content: str | list[TextPart]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=256)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Accepted and ignored (README): no reasoning models, no speculative decoding, text only.
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    prediction: Prediction | None = None
    modalities: list[Literal["text"]] | None = None
    continue_final_message: bool = False
    """vLLM's extension: continue the final (assistant) message instead of starting a new turn. The
    router uses it to resume a stream on another replica (wire/resume.py); clients may use it to prefill."""

    @field_validator("continue_final_message")
    @classmethod
    def _final_is_assistant(cls, v: bool, info: ValidationInfo) -> bool:
        messages = info.data.get("messages")
        if v and messages and messages[-1].role != "assistant":
            raise ValueError("it needs the last message to be from the assistant")
        return v

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("tool function names must be unique", param="tools")
        for i, t in enumerate(self.tools or []):
            if t.function.parameters is not None:
                check_schema(t.function.parameters, param=f"tools[{i}].function.parameters")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names the function {choice.function.name!r}, which is not among "
                                 f"the tools ({', '.join(names) or 'none given'})", param="tool_choice")
        if choice == "required" and not names:
            raise InvalidRequest("tool_choice 'required' needs at least one tool", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            if m.tool_calls and m.role != "assistant":
                raise InvalidRequest("only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls")
            if m.role == "tool" and not m.tool_call_id:
                raise InvalidRequest("a tool message needs the tool_call_id it answers",
                                     param=f"messages[{i}].tool_call_id")
        if self.logit_bias:
            check_logit_bias(self.logit_bias)
        return self

    def token_limit(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`; None = until context ends."""
        return self.max_completion_tokens or self.max_tokens

    def active_tools(self) -> list[Tool]:
        """The tools the model may call: none with tool_choice "none"."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def json_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type != "json_schema":
            return None
        return (rf.json_schema.schema_ if rf.json_schema else None) or {"type": "object"}

    def images(self) -> list[str]:
        """`messages[i].content[j]` of each image part."""
        return [f"messages[{i}].content[{j}]" for i, m in enumerate(self.messages) for j in m.images()]


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(union_mode="left_to_right")
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported (send one request per prompt)")
            return v[0]
        return v

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens 0 is only allowed with echo: true (to score the prompt)",
                                 param="max_tokens")
        if self.logit_bias:
            check_logit_bias(self.logit_bias)
        return self


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    keep_alive: KeepAlive = None

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


def check_logit_bias(bias: dict[str, float]) -> None:
    """Keys are token ids (decimal strings), as OpenAI's API has them."""
    for key in bias:
        if not key.isdigit() or len(key) > 9:
            raise InvalidRequest(f"logit_bias keys must be token ids (decimal integers), got {key[:40]!r}",
                                 param="logit_bias")
    if len(bias) > 1024:
        raise InvalidRequest("at most 1024 logit_bias entries", param="logit_bias")


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
        raise invalid_request(exc.errors(include_url=False)[0], _param) from None


def invalid_request(err: dict, param_of: Any) -> InvalidRequest:
    """The 400 for one pydantic error; `param_of` turns its location into the field's name."""
    param = param_of(tuple(err["loc"])) or None
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = repr(got) if isinstance(got, (int, float, bool, type(None))) or (
        isinstance(got, str) and len(got) < 60) else type(got).__name__
    return InvalidRequest(f"Invalid value for '{param}': {msg} (got {shown}).", param=param)

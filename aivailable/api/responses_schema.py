"""The request body of `POST /v1/responses` (OpenAI's Responses API) as strict pydantic models.

Fields the official client sends are accepted; unknown ones get the same 400 as the other endpoints
("Unrecognized request argument supplied"). Items a client copies back from a previous Response's
`output` (messages with `id`/`status`, `output_text` parts with `annotations`, `function_call` items)
validate too, so an agent loop can replay them as input.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from aivailable.errors import InvalidRequest
from aivailable.wire.schemas import invalid_request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=4_000_000)


class InputText(_Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None


class OutputText(_Strict):
    """An assistant's text, as a previous Response returned it (annotations and logprobs are ignored)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Strict):
    model_config = ConfigDict(extra="forbid", str_max_length=64 << 20)  # a data: URL (wire/schemas.ImageUrl)
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"
    prompt_cache_breakpoint: dict[str, Any] | None = None

    @field_validator("file_id")
    @classmethod
    def _no_files(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("this server has no Files API; send the image as image_url (a data: URL)")
        return v


ContentPart = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Strict):
    """A call the model made earlier (copied from a previous Response's output)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    caller: dict[str, Any] | None = None
    namespace: str | None = None


class FunctionCallOutputItem(_Strict):
    """The result of a function call, returned by the client."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText | OutputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    name: str | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_tag(v: Any) -> str:
    t = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")
    return t if t in ("message", "function_call", "function_call_output") else "unsupported"


class UnsupportedItem(_Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, v: str) -> str:
        raise ValueError("supported input item types are message, function_call and function_call_output")


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[UnsupportedItem, Tag("unsupported")], Discriminator(_item_tag)]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJSONObject(_Strict):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextConfig(_Strict):
    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(_Strict):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Strict):
    """`POST /v1/responses`. Stateless: nothing is stored, so `previous_response_id` and `conversation`
    are refused; `store`, `metadata` (echoed), `reasoning`, `include`, `service_tier`, `prompt_cache_key`,
    `safety_identifier`, `text.verbosity` are accepted and otherwise ignored."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(union_mode="left_to_right")
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    reasoning: Reasoning | None = None
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 metadata keys are allowed")
        if any(len(k) > 64 or len(s) > 512 for k, s in v.items()):
            raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return v

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stateless(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("this server is stateless and stores no responses or conversations; send the "
                             "whole conversation in `input` (earlier output items can be passed back as they are)")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [t.name for t in v or []]
        if len(names) != len(set(names)):
            raise ValueError("function names must be unique")
        return v


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_ITEM_TAGS = {"message", "function_call", "function_call_output", "unsupported", "input_text", "output_text",
              "refusal", "input_image", "text", "json_object", "json_schema", "function"}


def _param(loc: tuple[Any, ...]) -> str:
    """`("input", 0, "message", "content")` -> `input[0].content` (union and discriminator tags dropped)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or any(c in str(part) for c in "[(-") or str(part)[:1].isupper():
            continue  # a union branch: a type or a model name
        elif part in _ITEM_TAGS and i > 0 and (isinstance(loc[i - 1], int) or loc[i - 1] in ("format", "tool_choice")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_responses_request(body: Any) -> ResponsesRequest:
    """Validate a decoded JSON body; raise InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None)
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = max(errors, key=lambda e: len(e["loc"]))  # the deepest: the union branch the input meant
        raise invalid_request(err, _param) from None


# -- what the endpoint answers (described for /openapi.json; built by api/responses_api.py) -------------
class ResponseOutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any] | None = None


class ResponseMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[ResponseOutputText]


class ResponseFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """A Response (`stream: false`). With `stream: true` the body is `text/event-stream`: `event: TYPE` and
    `data: JSON` per event, from `response.created` to `response.completed`, `response.incomplete` or
    `response.failed`."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str
    output: list[Annotated[ResponseMessage | ResponseFunctionCall, Field(discriminator="type")]]
    usage: ResponseUsage | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    metadata: dict[str, str]
    previous_response_id: None
    store: Literal[False]

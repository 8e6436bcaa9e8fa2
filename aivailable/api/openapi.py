"""The OpenAPI 3.1 document of the public HTTP API, generated from the pydantic models.

Request bodies come from `wire/schemas.py` (the models that validate them); responses from the small
models below, which describe what `wire/responses.py` builds. Served at `GET /openapi.json`; the tests
validate it and fuzz a live node with it (schemathesis).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from aivailable import __version__
from aivailable.api.responses_schema import ResponseObject, ResponsesRequest
from aivailable.wire.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

OPENAPI_PATH = "/openapi.json"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx of the API: OpenAI's error shape."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    state: str | None = None
    embedding: bool | None = None
    vision: bool | None = None
    """The model has a multimodal projector: chat messages may carry image_url parts."""
    context_length: int | None = Field(
        None, description="Tokens one request can use (prompt and answer): the replica's context divided among "
                          "its parallel slots, ctx / parallel.")
    context_length_total: int | None = Field(
        None, description="The replica's whole context (ctx), shared by its `parallel` slots.")
    parallel: int | None = Field(None, description="Requests one replica serves at once, each in its own slot.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV cache the replica reused instead of computing them."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str
    """JSON text of the arguments; valid under the tool's schema when tool_choice forced the call."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    """Null when the answer is only tool calls."""
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    """stop, length, tool_calls (or cancelled)."""


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatCompletion(BaseModel):
    """Non-streamed answer; with `stream: true` the body is `text/event-stream` of chunks ending in [DONE]."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Health(BaseModel):
    status: Literal["ok"]
    node_id: str
    uptime_s: float
    models_ready: list[str]


_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorResponse,
                                        ModelList, ModelCard, ChatCompletion, Completion, EmbeddingList, Health,
                                        ResponsesRequest, ResponseObject)

# Statuses any /v1/ call may answer besides its success, each in the OpenAI error shape.
_ERRORS = {"400": "Invalid request: the message names the field (`param`).",
           "401": "Missing or wrong API key (only when the node requires keys).",
           "404": "Unknown model.", "408": "The body did not arrive within the node's body_timeout_s.",
           "413": "Body larger than the node's max_body_bytes.",
           "429": "Rate limit of the API key, or the model's queue is full; see Retry-After.",
           "503": "The model is loading, restarting or not placed yet; see Retry-After."}


# Before OpenAPI 3.2, a text/event-stream `schema` describes each event: `data` is a JSON chunk or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "one chunk as JSON, or [DONE] last"}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": _json("ErrorResponse")} for c in codes}


def _inference(summary: str, request: str, response: str, *, streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = dict(_json(response))
    if streams:
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    return {"post": {
        "summary": summary, "operationId": request[0].lower() + request[1:],
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {"200": {"description": "The result" + (" (server-sent events when `stream` is true)"
                                                              if streams else ""), "content": ok},
                      **_errors("400", "401", "404", "408", "413", "429", "503")}}}


@cache
def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once; the models do not change at run time)."""
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    get_models = {"summary": "The catalog, with each model's state", "operationId": "listModels",
                  "responses": {"200": {"description": "Every model of the cluster", "content": _json("ModelList")},
                                **_errors("401")}}
    get_model = {"summary": "One model", "operationId": "getModel",
                 "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                 "responses": {"200": {"description": "The model", "content": _json("ModelCard")},
                               **_errors("401", "404")}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "AIvailable node API", "version": __version__,
                 "description": "OpenAI-compatible API served by every node of an AIvailable cluster."},
        "paths": {
            "/v1/models": {"get": get_models},
            "/v1/models/{model}": {"get": get_model},
            "/v1/chat/completions": _inference("Chat completion", "ChatCompletionRequest", "ChatCompletion",
                                               streams=True),
            "/v1/completions": _inference("Text completion", "CompletionRequest", "Completion", streams=True),
            "/v1/embeddings": _inference("Embeddings", "EmbeddingRequest", "EmbeddingList", streams=False),
            "/v1/responses": _inference("Responses API (stateless)", "ResponsesRequest", "ResponseObject", streams=True),
            "/health": {"get": {"summary": "Liveness", "operationId": "health", "security": [],
                                "responses": {"200": {"description": "The node serves", "content": _json("Health")}}}},
        },
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "Needed only when the node is started with --api-key."}},
        },
        "security": [{}, {"apiKey": []}],
    }

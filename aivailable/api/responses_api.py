"""The Responses API as a translation of chat completions (pure functions and a sans-IO stream converter).

`POST /v1/responses` is served by converting its request into a chat-completions body
(:func:`chat_body`), which the node answers like any other chat request, and converting the answer back:
a chat completion into a Response object (:func:`response_from_chat`), a chat stream into the Responses
event stream (:class:`StreamConverter`). Ids and times are passed in, so the same input gives the same
output. Stateless: nothing is stored, every Response says `store: false`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from aivailable.api.responses_schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    MessageItem,
    Refusal,
    ResponsesRequest,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    ToolChoiceFunction,
)
from aivailable.errors import InvalidRequest

NewId = Callable[[str], str]
"""Makes an id with a prefix: `resp`, `msg` or `fc`."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ------------------------------------------------------------------------------------------
def chat_body(req: ResponsesRequest) -> tuple[dict[str, Any], list[str]]:
    """The chat-completions body for `req`, and for each chat message the request field it came from
    (`instructions`, `input`, `input[3]`), so an error about `messages[i]` can name the client's field."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
        origins.append("instructions")
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        origins.append("input")
    else:
        for i, item in enumerate(req.input):
            _add_item(messages, origins, item, f"input[{i}]")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "max_completion_tokens"),
                     ("user", "user")):
        value = getattr(req, src)
        if value is not None:
            body[dst] = value
    _add_tools(body, req)
    fmt = req.text.format if req.text else None
    if isinstance(fmt, TextFormatJSONObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, TextFormatJSONSchema):
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body, origins


def _add_item(messages: list[dict], origins: list[str], item: Any, where: str) -> None:
    if isinstance(item, MessageItem):
        content = item.content if isinstance(item.content, str) else [_part(p, f"{where}.content[{j}]")
                                                                      for j, p in enumerate(item.content)]
        messages.append({"role": item.role, "content": content})
        origins.append(where)
    elif isinstance(item, FunctionCallItem):
        call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)  # parallel calls, or a text answer with calls
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            origins.append(where)
    elif isinstance(item, FunctionCallOutputItem):
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        origins.append(where)


def _part(p: Any, where: str) -> dict[str, Any]:
    if isinstance(p, InputImage):
        if p.image_url is None:
            raise InvalidRequest(f"'{where}' needs an image_url (a data: URL or http(s) URL).",
                                 param=f"{where}.image_url")
        return {"type": "image_url", "image_url": {"url": p.image_url, "detail": p.detail}}
    if isinstance(p, Refusal):
        return {"type": "text", "text": p.refusal}
    return {"type": "text", "text": p.text}


def _add_tools(body: dict[str, Any], req: ResponsesRequest) -> None:
    """Tools, tool_choice and parallel_tool_calls, in chat's shapes. With no tools they are left out, so
    clients that always send `tools: []` and `parallel_tool_calls` get a plain answer."""
    tools = req.tools or []
    choice = req.tool_choice
    names = {t.name for t in tools}
    if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
        raise InvalidRequest(f"tool_choice names the function '{choice.name}', which is not in tools "
                             f"({', '.join(sorted(names)) or 'none'}).", param="tool_choice.name")
    if choice == "required" and not tools:
        raise InvalidRequest("tool_choice is 'required' but no tools were given.", param="tool_choice")
    if not tools:
        return
    chat_tools = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.name}
        for key in ("description", "parameters", "strict"):
            value = getattr(t, key)
            if value is not None:
                fn[key] = value
        chat_tools.append({"type": "function", "function": fn})
    body["tools"] = chat_tools
    if isinstance(choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls


_PARAM_NAMES = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                "response_format": "text.format", "stream_options": "stream"}


def client_param(param: str | None, origins: list[str]) -> str | None:
    """The client's name for a chat error's `param`: `messages[2].content` -> `input[1].content`."""
    if not param:
        return param
    head, sep, rest = param.partition(".")
    if head.startswith("messages[") and head.endswith("]"):
        try:
            where = origins[int(head[len("messages["):-1])]
        except (ValueError, IndexError):
            return param
        if where in ("instructions", "input"):
            return where
        return where + sep + rest
    if head in _PARAM_NAMES:
        return _PARAM_NAMES[head] + sep + rest
    return param


def renamed_error(raw: bytes, origins: list[str]) -> dict[str, Any] | None:
    """A chat endpoint's OpenAI error body with the client's field names (None: not such a body)."""
    try:
        err = json.loads(raw)["error"]
        message, param = str(err["message"]), err.get("param")
        kind, code = str(err.get("type") or "server_error"), err.get("code")
    except (ValueError, KeyError, TypeError):
        return None
    renamed = client_param(param, origins)
    if param and renamed and renamed != param:
        message = message.replace(param, renamed)
    return {"error": {"message": message, "type": kind, "param": renamed, "code": code}}


# -- response -----------------------------------------------------------------------------------------
def response_skeleton(req: ResponsesRequest, resp_id: str, created_at: int) -> dict[str, Any]:
    """A Response object in progress: every field echoed from the request, no output yet."""
    tools = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": t.strict} for t in req.tools or []]
    choice: Any = req.tool_choice if req.tool_choice is not None else "auto"
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "name": choice.name}
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
        {"type": "text"}
    text: dict[str, Any] = {"format": fmt}
    if req.text and req.text.verbosity:
        text["verbosity"] = req.text.verbosity
    return {
        "id": resp_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "max_tool_calls": None, "model": req.model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": False, "temperature": req.temperature, "text": text,
        "tool_choice": choice, "tools": tools, "top_p": req.top_p, "truncation": "disabled", "usage": None,
        "user": req.user, "safety_identifier": req.safety_identifier, "prompt_cache_key": req.prompt_cache_key,
        "metadata": dict(req.metadata or {}),
    }


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage (`prompt_tokens`, ...) in the Responses shape (`input_tokens`, ...)."""
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    inp, out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or inp + out)}


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def finished(skeleton: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
             usage: dict[str, Any] | None, completed_at: int) -> dict[str, Any]:
    """The final Response: `completed`, or `incomplete` when the answer was cut (length, content filter)."""
    reason = _INCOMPLETE.get(finish_reason or "")
    out = {**skeleton, "output": output, "usage": usage_from_chat(usage)}
    if reason:
        out.update(status="incomplete", incomplete_details={"reason": reason})
    else:
        out.update(status="completed", completed_at=completed_at)
    return out


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def response_from_chat(req: ResponsesRequest, completion: dict[str, Any], *, resp_id: str, created_at: int,
                       completed_at: int, ids: NewId = new_id) -> dict[str, Any]:
    """A (non-streamed) chat completion as a Response: a message item for its text, a function_call item
    for each tool call."""
    choice = (completion.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    finish = choice.get("finish_reason")
    output = []
    calls = msg.get("tool_calls") or []
    content = msg.get("content")
    if content or not calls:
        output.append(message_item(ids("msg"), content or "", "completed"))
    for call in calls:
        fn = call.get("function") or {}
        output.append(function_call_item(ids("fc"), call.get("id") or ids("call"), fn.get("name", ""),
                                         fn.get("arguments") or "", "completed"))
    if finish in _INCOMPLETE:
        output[-1]["status"] = "incomplete"  # the item that was cut
    return finished(response_skeleton(req, resp_id, created_at), output, finish, completion.get("usage"),
                    completed_at)


# -- stream -------------------------------------------------------------------------------------------
class StreamError(Exception):
    """The chat stream broke its own protocol (e.g. a tool call's delta for a call already finished)."""


def sse_event(event: dict[str, Any]) -> bytes:
    """One Responses server-sent event: `event: TYPE` and the JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


class SSEDecoder:
    """Splits a server-sent-event byte stream into the `data` payloads of its events (sans-IO)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data.replace(b"\r\n", b"\n")
        out = []
        while (cut := self._buf.find(b"\n\n")) >= 0:
            block, self._buf = self._buf[:cut], self._buf[cut + 2:]
            lines = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(lines).decode())
        return out


class StreamConverter:
    """Turns the chunks of a chat-completions stream into Responses events.

    `start()` gives `response.created` and `response.in_progress`; `feed(chunk)` the events for one chat
    chunk (a decoded JSON object); `finish()` (at `[DONE]`) closes the open item and gives
    `response.completed` or `response.incomplete`; `fail(message)` gives `error` and `response.failed`.
    Items follow each other: a message item for text, a function_call item per tool call; each is closed
    (`...done` events) before the next opens.
    """

    def __init__(self, req: ResponsesRequest, resp_id: str, created_at: int, ids: NewId = new_id):
        self.skeleton = response_skeleton(req, resp_id, created_at)
        self.ids = ids
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        """Chat tool-call index -> its function_call item."""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _snapshot(self, **changes: Any) -> dict[str, Any]:
        return json.loads(json.dumps({**self.skeleton, **changes}))

    def start(self) -> list[dict[str, Any]]:
        snap = self._snapshot()
        return [self._event("response.created", response=snap), self._event("response.in_progress", response=snap)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one chat chunk; raises StreamError for a chunk that breaks the chat protocol."""
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _text(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != "message":
            events += self._close()
            events += self._open_message()
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        events.append(self._event("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        item = message_item(self.ids("msg"), "", "in_progress")
        self.output.append(item)
        self.open = item
        at = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=at, item=_copy(item, content=[])),
                self._event("response.content_part.added", item_id=item["id"], output_index=at, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = int(call.get("index", 0))
        fn = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            if not fn.get("name"):
                raise StreamError(f"tool call {index} began without its function name")
            events += self._close()
            item = function_call_item(self.ids("fc"), call.get("id") or self.ids("call"), fn["name"], "",
                                      "in_progress")
            self.calls[index] = item
            self.output.append(item)
            self.open = item
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=_copy(item)))
        elif item is not self.open:
            raise StreamError(f"tool call {index} continued after the next output item began")
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=len(self.output) - 1, delta=fn["arguments"]))
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = self.output.index(item)
        item["status"] = status
        if item["type"] == "function_call":
            return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=at, item=_copy(item))]
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                            part=_copy(part)),
                self._event("response.output_item.done", output_index=at, item=_copy(item))]

    def finish(self, completed_at: int) -> list[dict[str, Any]]:
        """The chat stream ended normally (`[DONE]`): close the last item and give the final Response."""
        events: list[dict[str, Any]] = []
        status = "incomplete" if self.finish_reason in _INCOMPLETE else "completed"
        if not self.output:  # an empty answer is still a message, as in the non-streamed Response
            events += self._open_message()
        events += self._close(status)
        final = finished(self.skeleton, self.output, self.finish_reason, self.usage, completed_at)
        self.ended = True
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return events + [self._event(kind, response=json.loads(json.dumps(final)))]

    def fail(self, message: str, code: str | None = None) -> list[dict[str, Any]]:
        """The chat stream failed: an `error` event, then `response.failed` with what was produced so far."""
        item, self.open = self.open, None
        if item is not None:
            item["status"] = "incomplete"
        self.ended = True
        err_code = code if code in ("server_error", "rate_limit_exceeded") else "server_error"
        return [self._event("error", code=code or "server_error", message=message, param=None),
                self._event("response.failed", response=self._snapshot(
                    status="failed", output=self.output, error={"code": err_code, "message": message}))]


def _copy(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps({**obj, **changes}))

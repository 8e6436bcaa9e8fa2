"""From a validated chat request to what the template renders and how the answer is constrained.

`plan_chat` decides, per request: the messages the template sees (tool calls and tool results in the
model's own format, or folded into text for the generic format), the tools the template renders, the
grammar (tool calls, JSON Schema or JSON mode) and how the answer is parsed afterwards.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from aivailable.engine.grammar import JSON_GRAMMAR, schema_grammar
from aivailable.engine.media import image_mark
from aivailable.engine.tools import ToolDef, ToolFormat, generic_instructions, tool_grammar


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None = None
    """Tools handed to a template that renders them itself (native formats)."""
    tool_format: ToolFormat | None = None
    """How to parse tool calls out of the answer; None when the request has no active tools."""
    tool_names: set[str] = field(default_factory=set)
    grammar: str | None = None
    images: list[str] = field(default_factory=list)
    """The request's image URLs (data: URLs by now), in order; message texts mark where each goes."""
    image_nonce: str = ""
    """Part of every image mark, unguessable by clients (engine/media.py)."""


def _content(m, images: list[str], nonce: str) -> str:
    """The message's text, with a mark where each of its images goes (their URLs appended to `images`)."""
    if not m.images():
        return m.text()
    out = []
    for p in m.content:
        if p.type == "image_url":
            out.append(image_mark(nonce, len(images)))
            images.append(p.image_url.url)
        else:
            out.append(p.text)
    return "".join(out)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _choice(req) -> str:
    tc = req.tool_choice
    if tc is None or tc == "auto":
        return "auto"
    if tc == "required":
        return "required"
    return tc.function.name


def plan_chat(req, native: ToolFormat) -> ChatPlan:
    """`req` is a wire.schemas.ChatCompletionRequest; `native` the model template's tool format."""
    tools = [ToolDef(t.function.name, t.function.description or "",
                     t.function.parameters or {"type": "object", "properties": {}}) for t in req.active_tools()]
    generic = native is ToolFormat.GENERIC
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    nonce = secrets.token_hex(8)
    for m in req.messages:
        text = _content(m, images, nonce)
        if m.role == "assistant" and m.tool_calls:
            if generic:
                calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
                body = json.dumps({"tool_calls": calls}, ensure_ascii=False)
                messages.append({"role": "assistant", "content": f"{text}\n{body}" if text else body})
            else:
                messages.append({"role": "assistant", "content": text, "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in m.tool_calls]})
        elif m.role == "tool":
            if generic:
                result = json.dumps({"tool_result": {"tool_call_id": m.tool_call_id, "content": text}},
                                    ensure_ascii=False)
                messages.append({"role": "user", "content": result})
            else:
                messages.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id,
                                 **({"name": m.name} if m.name else {})})
        else:
            messages.append({"role": m.role, "content": text})
    plan = ChatPlan(messages, images=images, image_nonce=nonce)
    if tools:
        choice = _choice(req)
        parallel = req.parallel_tool_calls is not False
        plan.tool_format, plan.tool_names = native, {t.name for t in tools}
        plan.grammar = tool_grammar(native, tools, choice, parallel)
        if generic:
            note = generic_instructions(tools, choice)
            if messages and messages[0]["role"] in ("system", "developer"):
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
            else:
                messages.insert(0, {"role": "system", "content": note})
        else:
            plan.template_tools = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}} for t in tools]
            if choice not in ("auto", "required"):
                plan.template_tools = [t for t in plan.template_tools if t["function"]["name"] == choice]
        return plan
    schema = req.json_schema()
    if schema is not None:
        plan.grammar = schema_grammar(schema)
    elif req.response_format is not None and req.response_format.type == "json_object":
        plan.grammar = JSON_GRAMMAR
    return plan

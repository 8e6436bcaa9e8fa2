"""Tool calling: how tools reach the prompt, which grammar constrains the answer, how calls are parsed.

Formats. A GGUF whose chat template renders `tools` in one of the formats below gets them through its
own template (`native`), and the model's own output syntax is parsed:
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5/3, Hermes, SmolLM3...);
- llama3: a bare JSON object `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
Any other model (e.g. Gemma, whose GGUF has no template) uses the `generic` format: a compact list of
the tools goes into the system message, and the model answers either in plain text or with the JSON
object `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.

Grammars. `tool_choice: "required"` and a named function are enforced by a grammar built from the
tools' JSON schemas, so the arguments always parse and validate, even on a tiny model. With `"auto"`,
the generic format is constrained to "plain text not starting with `{`, or a valid tool-call object";
native formats generate freely and are parsed (a malformed call stays text).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aivailable.engine.grammar import Rules, literal
from aivailable.engine.textstop import held_back

MAX_PARALLEL_CALLS = 4
"""Calls one answer may hold under a grammar (a small model otherwise repeats calls until max_tokens)."""


class ToolFormat(StrEnum):
    GENERIC = "generic"
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"


@dataclass(frozen=True)
class ToolDef:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """JSON text of the arguments object."""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def detect_format(template: str | None) -> ToolFormat:
    """The tool syntax a chat template renders and expects, or GENERIC when it has none we know."""
    if not template or "tools" not in template:
        return ToolFormat.GENERIC
    if "<tool_call>" in template:
        return ToolFormat.HERMES
    if "[TOOL_CALLS]" in template:
        return ToolFormat.MISTRAL
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return ToolFormat.LLAMA3
    return ToolFormat.GENERIC


# -- the generic format's prompt -----------------------------------------------------------------

def _signature(tool: ToolDef) -> str:
    props = tool.parameters.get("properties") or {}
    required = set(tool.parameters.get("required") or [])
    args = []
    for name, schema in props.items():
        kind = schema.get("type", "any") if isinstance(schema, dict) else "any"
        if isinstance(schema, dict) and "enum" in schema:
            kind = "|".join(json.dumps(v) for v in schema["enum"])
        args.append(f"{name}{'' if name in required else '?'}: {kind if isinstance(kind, str) else '|'.join(kind)}")
    desc = _first_sentence(tool.description)
    return f"- {tool.name}({', '.join(args)}){': ' + desc if desc else ''}"


DESCRIPTION_CHARS = 120
"""Of each tool's description, the generic listing keeps the first sentence, at most this long: chat UIs
send dozens of tools with every request, and a small model's context must still hold the conversation."""


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = re.search(r"(?<=[.!?])\s", text)
    first = text[:end.start()] if end else text
    return first if len(first) <= DESCRIPTION_CHARS else first[:DESCRIPTION_CHARS - 1].rstrip() + "…"


def generic_instructions(tools: list[ToolDef], choice: str) -> str:
    """The system-message text that describes the tools (compact: the grammar enforces the schemas)."""
    lines = ["You can call these functions:", *(_signature(t) for t in tools),
             'To call functions, reply with only this JSON object: '
             '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}']
    if choice == "auto":
        lines.append("If no function is needed, reply to the user in plain text.")
    elif choice == "required":
        lines.append("You must call at least one function now.")
    else:
        lines.append(f"You must call the function {choice} now.")
    return "\n".join(lines)


# -- grammars ------------------------------------------------------------------------------------

def tool_grammar(fmt: ToolFormat, tools: list[ToolDef], choice: str, parallel: bool) -> str | None:
    """The grammar for `choice` ("auto", "required" or a function name), or None (generate freely)."""
    if choice == "auto" and fmt is not ToolFormat.GENERIC:
        return None
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    rules = Rules()
    alternatives = []
    args_key = "parameters" if fmt is ToolFormat.LLAMA3 else "arguments"
    for i, t in enumerate(chosen):
        args = rules.schema(t.parameters or {"type": "object"}, f"fn{i}-args",
                            param=f"tools[{t.name}].function.parameters")
        head = literal(f'{{"name": "{t.name}", "{args_key}": ')
        alternatives.append(rules.add(f"fn{i}-call", f'{head} {args} "}}"'))
    call = rules.add("call", " | ".join(alternatives))
    many = parallel and fmt is not ToolFormat.LLAMA3
    more = f"{{0,{MAX_PARALLEL_CALLS - 1}}}"
    if fmt is ToolFormat.HERMES:
        one = rules.add("tagged", f'"<tool_call>\\n" {call} "\\n</tool_call>"')
        body = f'{one} ("\\n" {one}){more}' if many else one
    elif fmt is ToolFormat.MISTRAL:
        body = f'"[TOOL_CALLS][" {call} ' + ('("," " "? ' + call + ')' + more + ' ' if many else "") + '"]"'
    elif fmt is ToolFormat.LLAMA3:
        body = call
    else:
        body = '"{\\"tool_calls\\": [" ' + call + (' ("," " "? ' + call + ')' + more if many else "") + ' "]}"'
    if fmt is ToolFormat.GENERIC and choice == "auto":
        rules.add("calls", body)
        rules.add("plain", "[^{ \\t\\n] [^\\x00]*")
        rules.add("root", "[ \\t\\n]* (calls | plain)?")
    else:
        rules.add("root", body)
    return rules.text()


# -- parsing -------------------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _call(obj: Any, args_key: str = "arguments") -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_prefix(text: str) -> tuple[Any, str] | None:
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return obj, text[end:]


def parse_calls(fmt: ToolFormat, text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """Split a finished answer into its text (None when it was only calls) and its tool calls. Calls to
    functions not in `names`, or that do not parse, leave the text as it was."""
    calls: list[ParsedCall] = []
    content = text
    stripped = text.strip()
    if fmt is ToolFormat.HERMES:
        for m in _HERMES.finditer(text):
            try:
                call = _call(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = _HERMES.sub("", text).strip()
    elif fmt is ToolFormat.MISTRAL:
        head, sep, rest = text.partition("[TOOL_CALLS]")
        if sep:
            got = _json_prefix(rest.strip())
            items = got[0] if got else None
            items = [items] if isinstance(items, dict) else items
            if not isinstance(items, list):
                return text, []
            calls = [c for c in (_call(i) for i in items) if c]
            if len(calls) != len(items):
                return text, []
            content = head.strip()
    elif fmt is ToolFormat.LLAMA3:
        body = stripped.removeprefix("<|python_tag|>").strip()
        if body.startswith("{"):
            got = _json_prefix(body)
            call = _call(got[0], "parameters") if got and not got[1].strip(" ;\n") else None
            if call:
                calls, content = [call], ""
    elif stripped.startswith("{"):
        got = _json_prefix(stripped)
        if got and isinstance(got[0], dict) and isinstance(got[0].get("tool_calls"), list):
            items = got[0]["tool_calls"]
            calls = [c for c in (_call(i) for i in items) if c]
            if len(calls) != len(items):
                return text, []
            content = got[1].strip()
    if not calls or any(c.name not in names for c in calls):
        return text, []
    return (content or None), calls


_TRIGGERS = {ToolFormat.HERMES: "<tool_call>", ToolFormat.MISTRAL: "[TOOL_CALLS]",
             ToolFormat.LLAMA3: "<|python_tag|>"}


class ToolStream:
    """Streams the text of an answer that may contain tool calls: text is released as it comes until
    a tool call may have started; from there on everything is held until the end and parsed then."""

    def __init__(self, fmt: ToolFormat, names: set[str]):
        self.fmt, self.names = fmt, names
        self.text = ""
        self._sent = 0
        self._holding = False

    def feed(self, delta: str) -> str:
        """Text that is safe to send now."""
        self.text += delta
        if self._holding:
            return ""
        text, sent = self.text, self._sent
        lead = text.lstrip()
        if self.fmt in (ToolFormat.GENERIC, ToolFormat.LLAMA3) and lead.startswith("{") and sent == 0:
            self._holding = True
            return ""
        if not lead and sent == 0:
            return ""  # only whitespace so far: a JSON call may still follow
        trigger = _TRIGGERS.get(self.fmt)
        if trigger:
            at = text.find(trigger, sent)
            if at >= 0:
                self._holding = True
                self._sent = at
                return text[sent:at]
            safe = len(text) - held_back(text, [trigger])
        else:
            safe = len(text)
        if safe > sent:
            self._sent = safe
            return text[sent:safe]
        return ""

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(text not yet sent, calls): a held part that holds no valid call is released as text."""
        content, calls = parse_calls(self.fmt, self.text, self.names)
        if not calls:
            return self.text[self._sent:], []
        sent, content = self.text[:self._sent].strip(), content or ""
        return (content[len(sent):].strip() if content.startswith(sent) else ""), calls

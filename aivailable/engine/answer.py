"""One request's answer, choice by choice: text, tool calls, logprobs, as chunks or as one body.

The worker feeds it what each sequence emits (`add` for a whole answer, `delta` for a stream) and the
sequence's GenResult at its end (`closing`, `body`). Tool calls are parsed out of the text in the
model's format (engine/tools.py); in a stream, text that may start a call is held back, and the calls
go out at the end the way OpenAI streams them: the id, type and name first, then the arguments in pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aivailable.engine import logprobs as lp
from aivailable.engine.tools import ParsedCall, ToolFormat, ToolStream, new_call_id, parse_calls
from aivailable.wire.responses import ChatShape, usage

ARGUMENT_PIECE = 24
"""Characters of tool-call arguments per streamed delta."""


@dataclass
class _Choice:
    tools: ToolStream | None
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    offset: int = 0
    """Characters of text sent so far (completions logprobs' text_offset)."""


class Answer:
    def __init__(self, shape: ChatShape, n: int, tool_format: ToolFormat | None, tool_names: set[str], *,
                 logprobs: bool = False, legacy_logprobs: bool = False, echo: str | None = None):
        self.shape, self.n = shape, n
        self._logprobs_on = logprobs
        self.tool_format, self.tool_names = tool_format, tool_names
        self.legacy, self.echo = legacy_logprobs, echo
        self.choices = [_Choice(ToolStream(tool_format, tool_names) if tool_format else None) for _ in range(n)]

    # -- whole answers ---------------------------------------------------------------------------
    def add(self, i: int, text: str, logprobs: list[dict] | None) -> None:
        c = self.choices[i]
        c.parts.append(text)
        if logprobs:
            c.logprobs.extend(logprobs)

    def body(self, results: list, n_prompt: int) -> dict:
        choices = []
        for i, (c, res) in enumerate(zip(self.choices, results, strict=True)):
            text = "".join(c.parts)
            calls: list[ParsedCall] = []
            if self.tool_format is not None:
                content, calls = parse_calls(self.tool_format, text, self.tool_names)
                text = content if calls else text
            finish = "tool_calls" if calls else res.finish_reason
            if self.legacy:
                logprobs = None
                if self._logprobs_on:
                    entries = (res.prompt_logprobs or []) + c.logprobs if self.echo is not None else c.logprobs
                    logprobs = lp.legacy(entries)
                shown = (self.echo or "") + (text or "")
                choices.append(self.shape.choice(i, shown, finish, logprobs=logprobs))
            else:
                tool_calls = [self._call_object(call) for call in calls] or None
                choices.append(self.shape.choice(i, text, finish, tool_calls=tool_calls,
                                                 logprobs=c.logprobs if self._logprobs_on else None))
        return self.shape.body(choices, self.usage(results, n_prompt))

    def usage(self, results: list, n_prompt: int) -> dict:
        completion = sum(r.completion_tokens for r in results)
        return usage(n_prompt, completion, results[0].cached_tokens if results else 0)

    @staticmethod
    def _call_object(call: ParsedCall) -> dict:
        return {"id": new_call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}

    # -- streams ---------------------------------------------------------------------------------
    def opening(self) -> list[dict]:
        chunks = [c for c in (self.shape.first_chunk(i) for i in range(self.n)) if c is not None]
        if self.echo:
            chunks += [self.shape.delta_chunk(self.echo, i) for i in range(self.n)]
            for c in self.choices:
                c.offset = len(self.echo)
        return chunks

    def delta(self, i: int, text: str, logprobs: list[dict] | None) -> list[dict]:
        c = self.choices[i]
        out = c.tools.feed(text) if c.tools else text
        if not out and not logprobs:
            return []
        shown = self._stream_logprobs(c, logprobs, out)
        return [self.shape.delta_chunk(out, i, shown)]

    def _stream_logprobs(self, c: _Choice, logprobs: list[dict] | None, text: str):
        if not self._logprobs_on:
            return None
        entries = logprobs or []
        if self.legacy:
            shown = lp.legacy(entries, c.offset)
            c.offset += len(text)
            return shown
        return entries

    def closing(self, i: int, res) -> list[dict]:
        c = self.choices[i]
        chunks = []
        calls: list[ParsedCall] = []
        if c.tools is not None:
            rest, calls = c.tools.finish()
            if rest:
                chunks.append(self.shape.delta_chunk(rest, i, [] if self._logprobs_on and not self.legacy else None))
        for k, call in enumerate(calls):
            chunks.append(self.shape.tool_chunk([{"index": k, "id": new_call_id(), "type": "function",
                                                  "function": {"name": call.name, "arguments": ""}}], i))
            args = call.arguments
            for at in range(0, len(args), ARGUMENT_PIECE):
                chunks.append(self.shape.tool_chunk([{"index": k, "function": {
                    "arguments": args[at:at + ARGUMENT_PIECE]}}], i))
        chunks.append(self.shape.finish_chunk("tool_calls" if calls else res.finish_reason, i))
        return chunks

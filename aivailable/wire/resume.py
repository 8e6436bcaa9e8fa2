"""Mid-stream resume: a stream whose replica dies after its first token goes on from another replica.

The router forwards whole server-sent events only, and keeps the ones it sent (`StreamLog`). When the
upstream breaks, `Continuation` turns the request and the text already sent into a new request:
- completions: the prompt with the text so far appended;
- chat: the messages plus an assistant message holding the text so far, with
  `continue_final_message: true`, vLLM's extension that our API also accepts. The replica renders
  the conversation and continues that message instead of opening a new turn.
The token budget is reduced by the text events already sent. A stream that broke before its first
token (chat had sent only its opening chunk) is asked again as it was. One that broke after its last
token, before its end, gets a one-token continuation whose text is dropped ("muted"): it supplies only
the finish and usage. The new stream's events are rewritten
(`Splice`): they carry the original `id` and `created`, chat's opening role chunk is dropped, and the
usage chunk counts both parts.

Our workers send one text event per token, except where a stop-string check held text back. So on a
resumed stream, usage and `max_tokens` are exact to within the events that carried several tokens. The
continuation is sampled with the same settings; at temperature 0 it is the answer one replica would have
given, up to the batching limit noted in engine/batch.py.

Two sides resume streams this way: a node's router among its peers' replicas (`api/router.py`), and the
failover client (`client.py`) among nodes, when the node it talked to is gone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from aivailable.wire.responses import sse

DONE = b"[DONE]"
UPSTREAM_FAILED = "upstream_failed"
"""The error code of the event that ends a stream no replica could continue."""
_SEP = b"\n\n"
_PREFIX = b"data: "
_PEER_BROKE = f'"code":"{UPSTREAM_FAILED}"'.encode()


def failure_event(message: str) -> bytes:
    """The OpenAI error event that ends a stream nobody could continue (code `upstream_failed`)."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": UPSTREAM_FAILED}})


def cut_at_failure(events: bytes) -> tuple[bytes, bytes]:
    """Split whole events at an `upstream_failed` error event (a node whose replica broke and which could
    not continue the stream): ``(events before it, the error event and what follows)``; the second part
    is empty when there is none. Whoever can continue the stream elsewhere holds it back."""
    broke = events.find(_PEER_BROKE)
    if broke < 0:
        return events, b""
    cut = events.rfind(_SEP, 0, broke)
    return (events[: cut + 2], events[cut + 2 :]) if cut >= 0 else (b"", events)


@dataclass
class Progress:
    """What the client has received of one stream."""

    text: str = ""
    text_events: int = 0
    id: str | None = None
    created: int | None = None
    finish_reason: str | None = None
    errored: bool = False

    def add(self, payload: bytes) -> None:
        """Account for one sent event's data."""
        if payload == DONE:
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            self.errored = True
            return
        self.id = self.id or obj.get("id")
        self.created = self.created or obj.get("created")
        for choice in obj.get("choices") or []:
            piece = choice.get("text")
            if piece is None:
                piece = (choice.get("delta") or {}).get("content")
            if piece:
                self.text += piece
                self.text_events += 1
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


class StreamLog:
    """What one stream has sent the client so far, and the tail of an unfinished upstream event.

    Sent events are kept as bytes and read (folded into a Progress) only every FOLD_BYTES or when a
    resume needs them, so the proxy does no JSON work per event, and a long stream keeps its text, not
    its events."""

    FOLD_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._sent = bytearray()
        self._tail = b""
        self._progress = Progress()
        self.done = False
        """The stream's `[DONE]` was sent: nothing is left to resume."""

    def split(self, data: bytes) -> bytes:
        """Take upstream bytes; return the complete events among them (with the tail kept from before)."""
        data = self._tail + data if self._tail else data
        cut = data.rfind(_SEP)
        if cut < 0:
            self._tail = data
            return b""
        self._tail = data[cut + 2 :]
        return data[: cut + 2]

    def new_upstream(self) -> None:
        """Forget the unfinished event of a replica that broke: it never reaches the client."""
        self._tail = b""

    def record(self, sent: bytes) -> None:
        """Remember events as they were sent to the client."""
        self._sent += sent
        if sent.endswith(_PREFIX + DONE + _SEP):
            self.done = True
        if len(self._sent) >= self.FOLD_BYTES:
            self._fold()

    def progress(self) -> Progress:
        """The text so far, how many events carried it, and the stream's identity."""
        self._fold()
        return dataclasses.replace(self._progress)

    def _fold(self) -> None:
        for event in bytes(self._sent).split(_SEP):
            for line in event.split(b"\n"):
                if line.startswith(_PREFIX):
                    self._progress.add(line[len(_PREFIX):])
        self._sent.clear()


def resumable(req: Any) -> bool:
    """Whether a broken stream of this validated request can be continued on another replica. Not when
    it has several choices (n > 1), echoes its prompt, or may call tools (a call's text is held back
    until its end and parsed then; a continuation could not rebuild it). The client then gets the
    `upstream_failed` event, as for a stream nobody can continue. Structured outputs do resume: the
    replica advances the grammar over the text so far."""
    if (getattr(req, "n", None) or 1) > 1 or getattr(req, "echo", False):
        return False
    active = getattr(req, "active_tools", None)
    return not (active and active())


@dataclass
class Continuation:
    """How to continue one validated streaming request (`kind` "chat" or "completions")."""

    kind: str
    body: dict[str, Any]
    """The request as forwarded (unset fields left out)."""
    token_limit: int | None
    """Its completion-token limit after defaults (None: until the context ends)."""

    def request(self, p: Progress) -> tuple[bytes, bool] | None:
        """The continuation request after `p` and whether it must be muted, or None when the stream had
        ended (or failed) on its own. Before any text, that is the request itself. With the token budget
        spent but the end not yet sent, it asks for one token and is muted: it supplies only the finish
        and usage (`Splice`)."""
        if p.errored or p.finish_reason is not None or self.kind not in ("chat", "completions"):
            return None
        body = dict(self.body)
        mute = False
        if self.token_limit is not None:
            left = self.token_limit - p.text_events
            if left < 1:
                left, mute = 1, True
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = left
        if p.text and self.kind == "completions":
            body["prompt"] = _prompt(body.get("prompt")) + p.text
        elif p.text:
            messages = list(body.get("messages") or [])
            if body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant":
                last = dict(messages[-1])
                last["content"] = _content(last.get("content")) + p.text
                messages[-1] = last
            else:
                messages.append({"role": "assistant", "content": p.text})
            body["messages"] = messages
            body["continue_final_message"] = True
        return json.dumps(body, separators=(",", ":")).encode(), mute


def _prompt(prompt: Any) -> str:
    return prompt[0] if isinstance(prompt, list) else str(prompt or "")


def _content(content: Any) -> str:
    if isinstance(content, list):  # content parts: the text ones, in order
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


@dataclass
class Splice:
    """Rewrites a continuation's events so the client sees one stream."""

    kind: str
    first: Progress
    mute: bool = False
    """The client already has all the text it asked for: pass on only the end (finish "length", usage)."""
    _opened: bool = field(default=False)

    def rewrite(self, events: bytes) -> bytes:
        out = bytearray()
        for event in events.split(_SEP):
            if not event.startswith(_PREFIX):
                continue
            payload = event[len(_PREFIX):]
            if payload != DONE:
                payload = self._rewrite(payload)
                if payload is None:
                    continue
            out += _PREFIX + payload + _SEP
        return bytes(out)

    def _rewrite(self, payload: bytes) -> bytes | None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return payload
        if not isinstance(obj, dict) or "error" in obj:
            return payload
        if self.first.id:
            obj["id"] = self.first.id
        if self.first.created:
            obj["created"] = self.first.created
        choices = obj.get("choices") or []
        if self.kind == "chat" and not self._opened and choices:
            delta = choices[0].get("delta") or {}
            if delta.get("role") and not delta.get("content") and not choices[0].get("finish_reason"):
                self._opened = True
                return None  # the client already had the opening role chunk
        if self.mute and choices:
            c = choices[0]
            if not c.get("finish_reason"):
                return None
            c["finish_reason"] = "length"
            if "text" in c:
                c["text"] = ""
            else:
                c["delta"] = {}
        usage = obj.get("usage")
        if usage and not choices:
            n = self.first.text_events
            prompt = max(0, int(usage.get("prompt_tokens", 0)) - n)
            completion = (0 if self.mute else int(usage.get("completion_tokens", 0))) + n
            obj["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
        return json.dumps(obj, separators=(",", ":")).encode()

"""Builders for OpenAI response bodies and server-sent-event chunks.

The workers build every answer with them (`engine/worker.py`, `engine/answer.py`); the router builds its
own events (a resumed stream's, `wire/resume.py`) with the same `sse`.
"""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    use: dict = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        use["prompt_tokens_details"] = {"cached_tokens": cached}
    return use


def sse(obj: dict | str) -> bytes:
    """One server-sent event; `obj` "[DONE]" gives the terminator."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class ChatShape:
    """Bodies and chunks of /v1/chat/completions."""

    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, new_id(self.prefix), int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, finish: str, use: dict) -> dict:
        return self.body([self.choice(0, text, finish)], use)

    def body(self, choices: list[dict], use: dict) -> dict:
        return {**self._head(self.object_full), "choices": choices, "usage": use}

    def choice(self, index: int, text: str | None, finish: str, *, tool_calls: list[dict] | None = None,
               logprobs: list[dict] | None = None) -> dict:
        """One non-streamed choice; `content` is null when the answer was only tool calls."""
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "finish_reason": finish,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}

    def first_chunk(self, index: int = 0) -> dict | None:
        return self._chunk({"role": "assistant", "content": ""}, None, index)

    def delta_chunk(self, text: str, index: int = 0, logprobs: list[dict] | None = None) -> dict:
        return self._chunk({"content": text}, None, index, logprobs)

    def tool_chunk(self, calls: list[dict], index: int = 0) -> dict:
        """`delta.tool_calls` pieces: {index, id, type, function: {name, arguments}} or {index, function: {arguments}}."""
        return self._chunk({"tool_calls": calls}, None, index)

    def finish_chunk(self, finish: str, index: int = 0) -> dict:
        return self._chunk({}, finish, index)

    def _chunk(self, delta: dict, finish: str | None, index: int = 0, logprobs: list[dict] | None = None) -> dict:
        lp = None if logprobs is None else {"content": logprobs, "refusal": None}
        return {**self._head(self.object_chunk),
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head(self.object_chunk), "choices": [], "usage": use}


class CompletionShape(ChatShape):
    """Bodies and chunks of /v1/completions (legacy text completions); logprobs in the legacy shape."""

    object_full = object_chunk = "text_completion"
    prefix = "cmpl"

    def choice(self, index: int, text: str | None, finish: str, *, tool_calls: list[dict] | None = None,
               logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def first_chunk(self, index: int = 0) -> dict | None:
        return None

    def delta_chunk(self, text: str, index: int = 0, logprobs: dict | None = None) -> dict:
        return self._text_chunk(text, None, index, logprobs)

    def finish_chunk(self, finish: str, index: int = 0) -> dict:
        return self._text_chunk("", finish, index)

    def _text_chunk(self, text: str, finish: str | None, index: int = 0, logprobs: dict | None = None) -> dict:
        return {**self._head(self.object_chunk),
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def embeddings_body(model: str, vectors: list[list[float]], n_tokens: int, encoding: str) -> dict:
    data = []
    for i, vec in enumerate(vectors):
        if encoding == "base64":
            import base64
            import struct

            emb: list[float] | str = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        else:
            emb = vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

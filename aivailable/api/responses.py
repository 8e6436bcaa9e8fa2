"""Builders for OpenAI response bodies and server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
        return {**self._head(self.object_full),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": use}

    def first_chunk(self) -> dict | None:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta_chunk(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def finish_chunk(self, finish: str) -> dict:
        return self._chunk({}, finish)

    def _chunk(self, delta: dict, finish: str | None) -> dict:
        return {**self._head(self.object_chunk),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head(self.object_chunk), "choices": [], "usage": use}


class CompletionShape(ChatShape):
    """Bodies and chunks of /v1/completions (legacy text completions)."""

    object_full = object_chunk = "text_completion"
    prefix = "cmpl"

    def full(self, text: str, finish: str, use: dict) -> dict:
        return {**self._head(self.object_full),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": use}

    def first_chunk(self) -> dict | None:
        return None

    def delta_chunk(self, text: str) -> dict:
        return self._text_chunk(text, None)

    def finish_chunk(self, finish: str) -> dict:
        return self._text_chunk("", finish)

    def _text_chunk(self, text: str, finish: str | None) -> dict:
        return {**self._head(self.object_chunk),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


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

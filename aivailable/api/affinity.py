"""Prefix-aware routing: the same conversation goes to the same replica from every entry node.

A replica keeps each slot's prompt KV after a request ends and reuses it, in whole 256-token chunks,
for the next prompt that starts the same way (engine/batch.py). Multi-turn chat repeats the whole
conversation every turn, so the turn-k+1 request is cheap only on the replica that served turn k.

The *affinity key* of a request names what the template renders first, canonically (never the raw
JSON bytes, so key order, whitespace and `"content": "x"` vs `[{"type": "text", "text": "x"}]` do not
matter):

- chat: the tools, then every message up to and including the first user message (system prompt,
  developer notes, the opening question). It is the same for every turn of one conversation, and
  different for different conversations behind one shared system prompt, which spreads them;
- completions: the first ``PREFIX_CHARS`` characters of the prompt (about one reuse chunk). A prompt
  shorter than that has no whole chunk to reuse, so it gets no key;
- embeddings: none.

Choice (``affine``): rendezvous (highest-random-weight) hashing of the key over the replica keys
(``node/model@gpus``, the same string on every node), weighted by slots, with *bounded loads*
(Mirrokni, Thorup, Zadimoghaddam 2018): the first replica in the key's order whose load after this
request stays within ``max(slots, floor(LOAD_BOUND x total load x its share of slots))`` takes it. A replica
with a free slot is always within the bound, so on a cluster with room every entry node makes the same
choice without talking to the others; a hot conversation overflows to its next replica in order
(which is also where it goes if its replica dies, so a resumed stream lands where its next turns will).
When no replica is within the bound the caller falls back to the power of two choices. Rendezvous
rather than a ring: no virtual nodes to tune, and adding or removing a replica moves only the keys
whose first choice it is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aivailable.wire.schemas import ChatCompletionRequest, CompletionRequest

PREFIX_CHARS = 1024
"""Characters of a completions prompt in its key: about 256 tokens, the engine's reuse granularity."""
LOAD_BOUND = 1.25
"""A replica may take a request while its load stays within this factor of the average (per slot)."""


class Replica(Protocol):
    key: str
    slots: int
    outstanding: int
    reported_load: int


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chat_key(req: ChatCompletionRequest) -> bytes:
    """The affinity key of a chat request: tools + messages through the first user message."""
    h = hashlib.blake2b(digest_size=16, person=b"aiv-chat")
    if req.tools:
        h.update(_canon([t.model_dump(exclude_none=True) for t in req.tools]).encode())
    h.update(b"\x00")
    for m in req.messages:
        parts: list[Any] = [m.role, m.name or "", m.text(), m.tool_call_id or ""]
        if isinstance(m.content, list):  # images are part of the prompt too
            parts += [p.image_url.url for p in m.content if getattr(p, "type", "") == "image_url"]
        if m.tool_calls:
            parts.append([[c.function.name, c.function.arguments] for c in m.tool_calls])
        h.update(_canon(parts).encode() + b"\x00")
        if m.role == "user":
            break
    return h.digest()


def completion_key(req: CompletionRequest) -> bytes | None:
    """The affinity key of a completions request: its first PREFIX_CHARS characters, or None if shorter."""
    prompt = req.prompt if isinstance(req.prompt, str) else ""
    if len(prompt) < PREFIX_CHARS:
        return None
    return hashlib.blake2b(prompt[:PREFIX_CHARS].encode(), digest_size=16, person=b"aiv-cmpl").digest()


def request_key(kind: str, req: Any) -> bytes | None:
    """The affinity key for an API request of `kind` (chat, completions, embeddings), or None."""
    if kind == "chat":
        return chat_key(req)
    if kind == "completions":
        return completion_key(req)
    return None


def score(key: bytes, replica_key: str, slots: int = 1) -> float:
    """Weighted rendezvous score of a replica for `key` (higher wins): slots / -ln(u), u uniform in (0, 1)."""
    d = hashlib.blake2b(key + b"\x00" + replica_key.encode(), digest_size=8).digest()
    u = (int.from_bytes(d, "big") + 0.5) / 2.0 ** 64
    return max(1, slots) / -math.log(u)


def order(key: bytes, replicas: Sequence[Replica]) -> list[Replica]:
    """Replicas in `key`'s preference order (the same on every node for the same replica set)."""
    return sorted(replicas, key=lambda r: (-score(key, r.key, r.slots), r.key))


def load(r: Replica) -> int:
    """Requests a replica is known to have: sent from here plus what its node last reported."""
    return r.outstanding + r.reported_load


def capacity(r: Replica, total_load: int, total_slots: int, bound: float = LOAD_BOUND) -> int:
    """Most requests `r` may hold after taking one more: its slots, or `bound` x its share of the load."""
    share = bound * (total_load + 1) * max(1, r.slots) / max(1, total_slots)
    return max(max(1, r.slots), math.floor(share))


def affine(replicas: Sequence[Replica], key: bytes, bound: float = LOAD_BOUND) -> Replica | None:
    """The first replica in `key`'s order within the load bound; None when every one is past it."""
    total = sum(load(r) for r in replicas)
    slots = sum(max(1, r.slots) for r in replicas)
    for r in order(key, replicas):
        if load(r) + 1 <= capacity(r, total, slots, bound):
            return r
    return None

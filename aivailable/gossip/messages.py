"""Versioned wire messages of the cluster cores, and the sans-IO body codec.

Every message is a frozen, slotted dataclass with a literal ``type`` tag. The cores build and read these
objects directly; only the transport turns them into bytes, with :func:`encode` / :func:`decode` here and
the signed envelope of :mod:`aivailable.gossip.envelope` around them.

Body format (JSON, UTF-8)::

    {"v": WIRE_VERSION, "type": "ping", ...fields}

The sender of a message is not a field: it is the authenticated sender of the envelope, handed to the
cores as ``step(src, msg, now)``. A body with another ``v`` raises :class:`UnknownVersion`; anything that
does not validate raises :class:`Malformed` (:class:`UnknownType` for a
type tag this node does not know). Both are :class:`EnvelopeError`\\ s with a ``reason`` code.

Also here: :class:`Send` (one outbound message) and :class:`Ready` (what a core hands its driver).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic

from aivailable.errors import NodeError

WIRE_VERSION = 1


class EnvelopeError(NodeError):
    """A datagram the transport must drop. ``reason`` is a stable code for the /metrics counter."""

    reason = "invalid"
    http_status = 400
    error_type = "invalid_request_error"


class Malformed(EnvelopeError):
    reason = "malformed"


class UnknownVersion(EnvelopeError):
    reason = "unknown_version"


class UnknownType(Malformed):
    """A well-formed body of a message type this node does not know (a newer peer)."""

    reason = "unknown_type"


class Status(enum.Enum):
    """A member's state as one node sees it. :meth:`transition` rejects moves SWIM never makes."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    def transition(self, new: Status) -> Status:
        """Return ``new`` if going there from ``self`` is legal, else raise ValueError."""
        if new is self or (self in (Status.DEAD, Status.LEFT) and new is Status.SUSPECT):
            raise ValueError(f"illegal member transition {self.value} -> {new.value}")
        return new


# ---- membership: piggybacked updates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    """``node`` is alive at ``incarnation`` and reachable at ``addr`` (opaque "host:port")."""

    node: str
    incarnation: int
    addr: str
    type: Literal["alive"] = "alive"


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    """``accuser`` could not reach ``node`` at ``incarnation``."""

    node: str
    incarnation: int
    accuser: str
    type: Literal["suspect"] = "suspect"


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    """``node`` is dead at ``incarnation``; ``accuser == node`` means it left on purpose."""

    node: str
    incarnation: int
    accuser: str
    type: Literal["dead"] = "dead"


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """``node``'s own facts; a higher ``version`` wins. The cores never look inside ``facts``."""

    node: str
    version: int
    facts: dict[str, Any]
    type: Literal["facts"] = "facts"


Update = Annotated[Alive | Suspect | Dead | Facts, pydantic.Field(discriminator="type")]


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberState:
    """One row of a full-state exchange (:class:`Sync`)."""

    node: str
    addr: str
    incarnation: int
    status: Status
    facts_version: int = 0
    facts: dict[str, Any] | None = None


# ---- membership: messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Direct probe of ``target``; answered by :class:`Ack` with the same ``seq``."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()
    type: Literal["ping"] = "ping"


@dataclass(frozen=True, slots=True, kw_only=True)
class PingReq:
    """Ask the receiver to probe ``target`` for us and forward the ack (SWIM indirect probe)."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()
    type: Literal["ping_req"] = "ping_req"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()
    type: Literal["ack"] = "ack"


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """An intermediary got no ack from the target in time: tells the origin its own link is fine."""

    seq: int
    type: Literal["nack"] = "nack"


@dataclass(frozen=True, slots=True, kw_only=True)
class Gossip:
    updates: tuple[Update, ...]
    type: Literal["gossip"] = "gossip"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sync:
    """Full-state push/pull (join, anti-entropy, partition healing). ``reply`` is False on the push."""

    members: tuple[MemberState, ...]
    reply: bool = False
    type: Literal["sync"] = "sync"


# ---- election ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VoterSet:
    """The voter set a leader decided, identified by ``(term, index)``; newer compares greater."""

    voters: tuple[str, ...]
    term: int = 0
    index: int = 0

    @property
    def id(self) -> tuple[int, int]:
        return (self.term, self.index)

    def majority(self) -> int:
        return len(self.voters) // 2 + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteRequest:
    """Candidate asks for a vote in ``term``. ``pre``: a pre-vote that changes nobody's state."""

    term: int
    pre: bool
    config_term: int
    config_index: int
    type: Literal["vote_request"] = "vote_request"


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteResponse:
    term: int
    pre: bool
    granted: bool
    type: Literal["vote_response"] = "vote_response"


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Leader's beat: its ``term``, its voter set, and ``sent_at`` (leader clock) echoed in the ack."""

    term: int
    sent_at: float
    lease: float
    config: VoterSet
    type: Literal["heartbeat"] = "heartbeat"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck:
    """``success`` False with a higher ``term`` deposes a stale leader."""

    term: int
    sent_at: float
    success: bool
    config_term: int = 0
    config_index: int = 0
    type: Literal["heartbeat_ack"] = "heartbeat_ack"


# ---- placement -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPublish:
    """The coordinator's desired state, fenced by ``(term, version)``; ``assignments`` is opaque."""

    term: int
    version: int
    assignments: dict[str, Any] = field(default_factory=dict)
    type: Literal["placement"] = "placement"


# ---- model files ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRequest:
    """Ask a holder for a model file's manifest (``chunk == -1``: per-chunk sha256 list) or one chunk.

    Sent to ``POST /_cluster/files`` in a signed envelope; the answer is the manifest JSON or the raw
    chunk bytes (verified by the requester against the manifest and the catalog's whole-file sha256)."""

    sha256: str
    chunk_size: int
    chunk: int = -1
    type: Literal["file_request"] = "file_request"


# ---- API keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySetSync:
    """The sender's whole API key set (aivailable/apikeys/keyset.py records: salted hashes, never a key).

    Sent to ``POST /_cluster/keys`` in a signed envelope; the receiver merges it and answers with its own
    merged set in a signed envelope of the same type, so one round trip brings both sides level."""

    records: list[dict[str, Any]] = field(default_factory=list)
    type: Literal["key_set"] = "key_set"


Message = Annotated[
    Ping
    | PingReq
    | Ack
    | Nack
    | Gossip
    | Sync
    | VoteRequest
    | VoteResponse
    | Heartbeat
    | HeartbeatAck
    | PlacementPublish
    | FileRequest
    | KeySetSync,
    pydantic.Field(discriminator="type"),
]
MEMBERSHIP_TYPES = (Ping, PingReq, Ack, Nack, Gossip, Sync)
ELECTION_TYPES = (VoteRequest, VoteResponse, Heartbeat, HeartbeatAck)

_ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Message)
_TYPE_NAMES = frozenset(
    cls.__dataclass_fields__["type"].default for cls in (*MEMBERSHIP_TYPES, *ELECTION_TYPES, PlacementPublish, FileRequest,
                                                           KeySetSync)
)


def encode(msg: Any) -> bytes:
    """Message object -> body bytes (compact JSON with the wire version)."""
    body = _ADAPTER.dump_python(msg, mode="json")
    return json.dumps({"v": WIRE_VERSION, **body}, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    """Body bytes -> message object; raises :class:`Malformed` or :class:`UnknownVersion`."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"body is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise Malformed("body is not a JSON object")
    version = obj.pop("v", None)
    if version != WIRE_VERSION:
        raise UnknownVersion(f"message version {version!r} (this node speaks {WIRE_VERSION})")
    if obj.get("type") not in _TYPE_NAMES:
        raise UnknownType(f"unknown message type {str(obj.get('type'))[:40]!r}")
    try:
        return _ADAPTER.validate_python(obj)
    except pydantic.ValidationError as exc:
        raise Malformed(
            f"invalid message: {exc.error_count()} error(s), first: {exc.errors()[0]['msg']}"
        ) from exc


# ---- core outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """One message to send: to node ``to`` (``addr`` set when the core knows it, or for join seeds)."""

    to: str
    msg: Any
    addr: str | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """What a core asks its driver to do, in this order: write ``persist`` (if not None) durably, then
    send ``messages``, then act on ``events``, then call ``core.advance()``."""

    messages: tuple[Send, ...] = ()
    events: tuple[Any, ...] = ()
    persist: Any = None

    def __bool__(self) -> bool:
        return bool(self.messages or self.events or self.persist is not None)

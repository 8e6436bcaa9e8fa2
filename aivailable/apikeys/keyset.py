"""The cluster's API keys as a replicated set: a state-based CRDT (sans-IO, no clock of its own).

A key set maps a key's *name* to its :class:`Record`. Every change (add, revoke) writes a new record for
the name, stamped ``(timestamp_ms, node_id)`` by the node that made it; :func:`merge` keeps, per name, the
record with the highest :func:`order` (stamp first; on an equal stamp a revoke beats an add; then the
canonical text, so that any two records are ordered and merging is deterministic). A revoked key stays as
a *tombstone* (``revoked = True``), so a node that missed the revoke learns it, instead of resurrecting
the key from an older copy. Taking the maximum per name under a total order makes :func:`merge`
commutative, associative and idempotent: nodes may exchange sets in any order, any number of times, and
all that saw the same records hold the same set (tests/test_apikeys.py checks these with hypothesis).

**Why a CRDT and not (term, version) from the coordinator.** Placement is fenced by the coordinator's
term because only one node may decide it. Keys are different: an admin must be able to add or revoke a key
while there is no coordinator (the majority is lost, or a partition), and both sides' changes must survive
the healing. Last-writer-wins per name needs no leader and no quorum; the price is that two admins changing
the same name at once keep the later stamp (clocks of a lab's machines are NTP-close; a revoke wins a tie).

**Key text.** ``aiv-<key id>-<secret>``: the key id (16 hex digits) finds the record, the secret part is
compared by its salted SHA-256 in constant time. The secret part is 256 random bits, so a fast hash is
enough: a slow KDF protects guessable passwords, and nobody can guess 2^256. The key text is shown once,
when the key is made; neither it nor the secret part is ever stored, gossiped or logged.

**Version.** :func:`digest` (16 hex digits of SHA-256 over the canonical set) names one version; nodes
gossip it and pull a peer's set when theirs differs (aivailable/keysync.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

KEY_PREFIX = "aiv-"
KEY_ID_HEX = 16
KINDS = ("user", "viewer")
MAX_EXPIRES = 253402300799.0
"""The latest expiry a key may have (9999-12-31T23:59:59Z): every date and time library can print it."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
"""A key's name: what `keys list` shows and `keys revoke` takes."""
_KEY_RE = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{KEY_ID_HEX}}})-([A-Za-z0-9_-]{{32,128}})")


class RecordError(ValueError):
    """A record (from a peer or the state file) that does not have the expected shape; names the field."""


@dataclass(frozen=True)
class Record:
    """One key's entry (or tombstone) in the set. Times: ``created``/``expires`` in UTC epoch seconds,
    ``stamp`` = (milliseconds since the epoch, node id) of the change that wrote this record."""

    name: str
    kind: str
    key_id: str
    salt: str
    hash: str
    models: tuple[str, ...] = ()
    """The models the key may use; empty = all."""
    rpm: int = 0
    """Requests per minute cluster-wide (aivailable/apikeys/quota.py); 0 = no limit."""
    expires: float | None = None
    created: float = 0.0
    stamp: tuple[int, str] = (0, "")
    revoked: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"], d["stamp"] = list(self.models), list(self.stamp)
        return d

    @classmethod
    def from_dict(cls, d: object) -> Record:
        """A record from its JSON form; RecordError naming the bad field."""
        if not isinstance(d, Mapping):
            raise RecordError("a key record must be a JSON object")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise RecordError(f"unknown field {unknown[0]!r}")
        try:
            stamp = d["stamp"]
            rec = cls(name=_str(d, "name"), kind=_str(d, "kind"), key_id=_str(d, "key_id"), salt=_str(d, "salt"),
                      hash=_str(d, "hash"), models=tuple(_strs(d.get("models", []))), rpm=_int(d, "rpm"),
                      expires=None if d.get("expires") is None else float(d["expires"]),
                      created=float(d.get("created", 0.0)), stamp=(int(stamp[0]), str(stamp[1])),
                      revoked=bool(d.get("revoked", False)))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"bad key record: {type(exc).__name__}: {exc}") from None
        if not NAME_RE.fullmatch(rec.name):
            raise RecordError(f"field 'name': {rec.name[:70]!r} is not a key name")
        if rec.kind not in KINDS:
            raise RecordError(f"field 'kind': {rec.kind[:20]!r} is not one of {', '.join(KINDS)}")
        return rec

    def active(self, now: float) -> bool:
        """Not revoked and not expired at `now` (epoch seconds)."""
        return not self.revoked and not self.expired(now)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def view(self) -> dict:
        """What `GET /admin/keys` shows: everything but the salt and hash."""
        return {"name": self.name, "kind": self.kind, "models": list(self.models), "rpm": self.rpm,
                "expires": self.expires, "created": self.created, "fingerprint": fingerprint(self.key_id),
                "revoked": self.revoked}


def _str(d: Mapping, k: str) -> str:
    v = d[k]
    if not isinstance(v, str):
        raise RecordError(f"field {k!r} must be a string")
    return v


def _strs(v: object) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RecordError("field 'models' must be a list of model names")
    return v


def _int(d: Mapping, k: str) -> int:
    v = d.get(k, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RecordError(f"field {k!r} must be a whole number >= 0")
    return v


def fingerprint(key_id: str) -> str:
    """How a cluster key shows in lists, logs and metrics: its public key id, never the secret part."""
    return f"{KEY_PREFIX}{key_id}"


def order(r: Record) -> tuple:
    """The total order that decides which of two records of a name wins: the later stamp, then a revoke,
    then the canonical text (only equal stamps from one node could need it; it keeps merge deterministic)."""
    return (r.stamp, r.revoked, canonical([r]))


def canonical(records: Iterable[Record]) -> str:
    return json.dumps([r.to_dict() for r in sorted(records, key=lambda r: r.name)], sort_keys=True,
                      separators=(",", ":"))


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeySet:
    """An immutable key set: name -> record (tombstones included)."""

    records: Mapping[str, Record] = field(default_factory=dict)

    def get(self, name: str) -> Record | None:
        return self.records.get(name)

    def active(self, now: float) -> list[Record]:
        return [r for r in self.records.values() if r.active(now)]

    def protecting(self) -> bool:
        """True while any key is not revoked (an expired one included): then /v1 needs a key. Expiry alone
        never reopens a cluster; revoking its last key does (README "API keys")."""
        return any(not r.revoked for r in self.records.values())

    def by_key_id(self) -> dict[str, Record]:
        return {r.key_id: r for r in self.records.values() if not r.revoked}

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in sorted(self.records.values(), key=lambda r: r.name)]

    @classmethod
    def from_list(cls, items: object) -> KeySet:
        if not isinstance(items, list):
            raise RecordError("a key set must be a JSON list of records")
        return merge(KeySet(), [Record.from_dict(d) for d in items])


def merge(a: KeySet, incoming: KeySet | Iterable[Record]) -> KeySet:
    """`a` joined with `incoming`: per name, the record with the highest `order`."""
    out = dict(a.records)
    recs = incoming.records.values() if isinstance(incoming, KeySet) else incoming
    for r in recs:
        mine = out.get(r.name)
        if mine is None or order(r) > order(mine):
            out[r.name] = r
    return KeySet(out)


def digest(ks: KeySet) -> str:
    """16 hex digits naming this version of the set (equal sets, equal digests, on every node)."""
    return hashlib.sha256(canonical(ks.records.values()).encode()).hexdigest()[:16]


def next_stamp(ks: KeySet, name: str, now_ms: int, node_id: str) -> tuple[int, str]:
    """A stamp later than the name's current record, even if this node's clock is behind its writer's."""
    cur = ks.get(name)
    return (max(now_ms, cur.stamp[0] + 1 if cur else 0), node_id)


class ChangeError(ValueError):
    """An add or revoke that the set refuses: `status` 400 (bad field `param`), 404 or 409."""

    def __init__(self, message: str, status: int, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def add(ks: KeySet, *, name: str, kind: str = "user", models: Iterable[str] = (), rpm: int = 0,
        expires: float | None = None, now: float, node_id: str, entropy: bytes | None = None
        ) -> tuple[KeySet, str]:
    """(the set with a new key `name`, the key's text). `entropy` (48 bytes) makes it deterministic for
    tests; None takes it from `secrets`. ChangeError for a bad field or a name that is in use."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ChangeError("name must be 1-64 letters, digits or ._@- (starting with a letter or digit)", 400, "name")
    if kind not in KINDS:
        raise ChangeError(f"kind must be one of {', '.join(KINDS)}", 400, "kind")
    models = tuple(models)
    if not all(isinstance(m, str) and m for m in models):
        raise ChangeError("models must be a list of model names", 400, "models")
    if isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 0:
        raise ChangeError("rpm must be a whole number >= 0 (0 = no limit)", 400, "rpm")
    if expires is not None and expires <= now:
        raise ChangeError("expires is in the past", 400, "expires")
    cur = ks.get(name)
    if cur is not None and cur.active(now):
        raise ChangeError(f"a key named {name!r} exists; revoke it first or choose another name", 409, "name")
    raw = entropy if entropy is not None else secrets.token_bytes(48)
    key_id, salt = raw[:8].hex(), raw[8:24].hex()
    secret = secrets.token_urlsafe(32) if entropy is None else raw[24:48].hex()
    rec = Record(name=name, kind=kind, key_id=key_id, salt=salt, hash=_hash(salt, secret),
                 models=tuple(sorted(set(models))), rpm=rpm, expires=expires, created=now,
                 stamp=next_stamp(ks, name, int(now * 1000), node_id))
    return merge(ks, [rec]), f"{KEY_PREFIX}{key_id}-{secret}"


def revoke(ks: KeySet, name: str, *, now: float, node_id: str) -> KeySet:
    """The set with `name` revoked (a tombstone); ChangeError 404 when there is no such key."""
    cur = ks.get(name)
    if cur is None or cur.revoked:
        raise ChangeError(f"no key named {name!r}" + (" (it is already revoked)" if cur else ""), 404, "name")
    tomb = replace(cur, revoked=True, stamp=next_stamp(ks, name, int(now * 1000), node_id))
    return merge(ks, [tomb])


class Verdict(Enum):
    OK = "ok"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"


def parse_key(text: str) -> tuple[str, str] | None:
    """(key id, secret part) of a cluster key's text; None when `text` is not one."""
    m = _KEY_RE.fullmatch(text)
    return (m.group(1), m.group(2)) if m else None


def verify(ks: KeySet, text: str, now: float, index: Mapping[str, Record] | None = None
           ) -> tuple[Verdict, Record | None]:
    """Whether `text` is a usable key of the set at `now`, and its record. `index` is `ks.by_key_id()`
    (pass it to save rebuilding it per request). The secret part is compared in constant time."""
    parsed = parse_key(text)
    if parsed is None:
        return Verdict.UNKNOWN, None
    key_id, secret = parsed
    rec = (index if index is not None else ks.by_key_id()).get(key_id)
    if rec is None:
        tomb = next((r for r in ks.records.values() if r.key_id == key_id), None)
        if tomb is not None and hmac.compare_digest(_hash(tomb.salt, secret), tomb.hash):
            return Verdict.REVOKED, tomb
        return Verdict.UNKNOWN, None
    if not hmac.compare_digest(_hash(rec.salt, secret), rec.hash):
        return Verdict.UNKNOWN, None
    if rec.expired(now):
        return Verdict.EXPIRED, rec
    return Verdict.OK, rec

"""Sans-IO signed envelope around every inter-node message.

``seal(body, secret, sender, now, nonce) -> bytes`` and ``open(data, secret, now, replay_cache) ->
(sender, message)``. The caller supplies the wall-clock time (``time.time()``: peers compare timestamps,
so a monotonic clock will not do) and the nonce (``os.urandom(16)``); nothing here reads a clock or a
random source, so every rejection can be tested byte by byte.

Frame (all integers big-endian)::

    b"AIV" | version u8 | header_len u16 | header JSON {"sender","ts","nonce","mac"} | body

``ts`` is integer milliseconds. ``mac`` is hex HMAC-SHA256 with the cluster secret over the
length-prefixed fields (version, sender, ts, nonce, body), so no field can bleed into another.

Checks in :func:`open`, in order, each a distinct :class:`EnvelopeError` subclass with a ``reason`` code
for the /metrics counter: ``oversized``, ``malformed`` (truncated frame, bad header JSON or fields, bad
body), ``unknown_version`` (frame or body), ``missing_signature``, ``bad_signature``, ``stale``
(``|now - ts| > replay_cache.window``; skew inside the window is accepted), ``replayed`` (nonce already
seen inside the window), ``unknown_type``. The MAC is checked before the clock and the replay cache,
so a forger can neither fill the cache nor probe the window.

``cluster_id_hash(secret)`` is what mDNS may announce: it identifies the cluster, never reveals the secret
(it is an HMAC of a fixed label; still, use a long random secret, a short one can be guessed offline).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import struct
from typing import Any

from aivailable.errors import ConfigError
from aivailable.gossip.messages import EnvelopeError, Malformed, UnknownVersion, decode, encode

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_BYTES",
    "WINDOW_S",
    "BadSignature",
    "EnvelopeError",
    "Malformed",
    "MissingSignature",
    "Oversized",
    "ReplayCache",
    "Replayed",
    "StaleTimestamp",
    "UnknownVersion",
    "cluster_id_hash",
    "open",
    "seal",
    "unseal",
]

ENVELOPE_VERSION = 1
MAGIC = b"AIV"
MAX_BYTES = 256 * 1024  # one envelope; a full-state Sync of ~1,000 members fits
WINDOW_S = 30.0  # accepted |now - ts|, seconds: covers NTP-less lab clocks, bounds the replay cache
_HEAD = struct.Struct(">3sBH")
_MAX_SENDER = 128


REJECT_STATUS = {"oversized": 413, "missing_signature": 401, "bad_signature": 401, "own_id": 409,
                 "wrong_node_cert": 403, "plaintext": 421}
"""HTTP status of a refused envelope by reason (every other reason: 400); one mapping for every endpoint.
``wrong_node_cert``: signed by one node id, sent over a TLS connection whose certificate names another.
``plaintext``: cluster traffic to the plain API port of a node that takes it only over TLS.
``own_id``: validly signed, but with the receiver's own id as sender (a misconfigured twin or a reflection)."""


class Oversized(EnvelopeError):
    reason = "oversized"


class MissingSignature(EnvelopeError):
    reason = "missing_signature"


class BadSignature(EnvelopeError):
    reason = "bad_signature"


class StaleTimestamp(EnvelopeError):
    reason = "stale"


class Replayed(EnvelopeError):
    reason = "replayed"


def _secret_bytes(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ConfigError("the cluster secret is empty", param="secret")
    return key


def _mac(key: bytes, sender: str, ts_ms: int, nonce: str, body: bytes) -> str:
    parts = (str(ENVELOPE_VERSION).encode(), sender.encode(), str(ts_ms).encode(), nonce.encode(), body)
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.hexdigest()


def cluster_id_hash(secret: bytes | str) -> str:
    """Short public id of the cluster for mDNS (16 hex chars); equal secrets give equal ids."""
    return hmac.new(_secret_bytes(secret), b"aivailable cluster id v1", hashlib.sha256).hexdigest()[:16]


def seal(body: bytes | Any, secret: bytes | str, sender: str, now: float, nonce: bytes | str) -> bytes:
    """Frame and sign ``body`` (bytes, or a message object encoded with :func:`messages.encode`)."""
    if not sender or len(sender) > _MAX_SENDER or not sender.isprintable():
        raise ValueError(f"bad sender id {sender!r}")
    nonce_s = nonce.hex() if isinstance(nonce, bytes) else nonce
    if not 8 <= len(nonce_s) <= 128:
        raise ValueError("nonce must be 4 to 64 bytes")
    payload = body if isinstance(body, bytes) else encode(body)
    ts_ms = round(now * 1000)
    mac = _mac(_secret_bytes(secret), sender, ts_ms, nonce_s, payload)
    header = json.dumps({"sender": sender, "ts": ts_ms, "nonce": nonce_s, "mac": mac}, separators=(",", ":"))
    header = header.encode()
    return _HEAD.pack(MAGIC, ENVELOPE_VERSION, len(header)) + header + payload


class ReplayCache:
    """Nonces seen inside the time window, bounded in size.

    An entry lives until its message's ``ts + window`` (after that the timestamp check rejects a replay
    anyway). When full, the entry that expires first is evicted and messages as old as it are refused
    from then on (``floor``): the cache fails closed, never open.
    """

    def __init__(self, window: float = WINDOW_S, max_entries: int = 100_000):
        if window <= 0:
            raise ConfigError("replay window must be > 0 seconds", param="window")
        if max_entries < 1:
            raise ConfigError("replay cache needs at least one entry", param="max_entries")
        self.window = window
        self.max_entries = max_entries
        self.floor = float("-inf")  # messages with ts <= floor are refused (evicted while still fresh)
        self._seen: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, sender: str, nonce: str, ts: float, now: float) -> bool:
        """True (and remember it) if ``(sender, nonce)`` is new; False for a replay."""
        self.expire(now)
        key = (sender, nonce)
        if key in self._seen or ts <= self.floor:
            return False
        while len(self._seen) >= self.max_entries:
            expiry, old = heapq.heappop(self._heap)
            del self._seen[old]
            self.floor = max(self.floor, expiry - self.window)
        expiry = ts + self.window
        self._seen[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
        return True

    def expire(self, now: float) -> None:
        """Drop entries whose window has passed (also done by every :meth:`check_and_add`)."""
        heap = self._heap
        while heap and heap[0][0] < now:
            _, key = heapq.heappop(heap)
            del self._seen[key]


def open(  # noqa: A001 - the codec's verb pair is seal/open, like NaCl's box
    data: bytes,
    secret: bytes | str,
    now: float,
    replay_cache: ReplayCache,
    *,
    max_bytes: int = MAX_BYTES,
) -> tuple[str, Any]:
    """Verify and decode one envelope; return ``(sender, message)`` or raise an :class:`EnvelopeError`.

    The accepted clock skew is ``replay_cache.window``: one number bounds both."""
    if len(data) > max_bytes:
        raise Oversized(f"envelope of {len(data)} bytes > {max_bytes}")
    if len(data) < _HEAD.size:
        raise Malformed("truncated envelope")
    magic, version, header_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise Malformed("not an AIvailable envelope")
    if version != ENVELOPE_VERSION:
        raise UnknownVersion(f"envelope version {version} (this node speaks {ENVELOPE_VERSION})")
    end = _HEAD.size + header_len
    if len(data) < end:
        raise Malformed("truncated envelope header")
    try:
        header = json.loads(data[_HEAD.size : end])
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed("envelope header is not JSON") from exc
    if not isinstance(header, dict):
        raise Malformed("envelope header is not an object")
    sender, ts_ms, nonce, mac = (header.get(k) for k in ("sender", "ts", "nonce", "mac"))
    if not (isinstance(sender, str) and sender and isinstance(nonce, str) and nonce):
        raise Malformed("envelope header lacks sender or nonce")
    if not (sender.isprintable() and nonce.isascii()) or len(sender) > _MAX_SENDER:
        raise Malformed("envelope sender or nonce is not a printable id")
    try:
        sender.encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON allows it, UTF-8 does not
        raise Malformed("envelope sender is not valid UTF-8") from None
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool):
        raise Malformed("envelope timestamp is not an integer")
    if not mac:
        raise MissingSignature(f"unsigned envelope from {sender[:_MAX_SENDER]!r}")
    body = data[end:]
    expected = _mac(_secret_bytes(secret), sender, ts_ms, nonce, body)
    if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
        raise BadSignature(f"bad signature on envelope from {sender[:_MAX_SENDER]!r}")
    ts = ts_ms / 1000
    if abs(now - ts) > replay_cache.window:
        raise StaleTimestamp(f"timestamp {now - ts:+.3f}s off, window {replay_cache.window}s")
    if not replay_cache.check_and_add(sender, nonce, ts, now):
        raise Replayed(f"replayed nonce from {sender!r}")
    return sender, decode(body)


unseal = open

"""Signed hops: a node that forwards a client's request to a peer signs it with the cluster secret.

API-key rate limits count where a request enters the cluster. The hop counter header alone cannot
show that a request was forwarded, since any client can set it. So a forwarding node adds
`X-AIvailable-Hop-Auth: <sender>.<ts_ms>.<nonce>.<mac>`, an HMAC-SHA256 with the cluster secret over
the sender, the time, a fresh nonce and the path. The peer still checks the client's API key, but does
not charge its bucket a second time. A header that is missing, forged, outside the gossip time window or
replayed (nonces are remembered for the window) is ignored, and the request is charged as any client's.

The same signature is what makes a request count as forwarded at all: a request whose hop counter
(`X-AIvailable-Hops`) is not backed by a valid signature is a fresh client request (its demand is
recorded and every replica is eligible), whatever counter it carries. `parse_count` is the one parser of
that counter; a value that is not a small non-negative integer is a 400 naming the header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from aivailable.errors import InvalidRequest
from aivailable.gossip.envelope import WINDOW_S, ReplayCache

HEADER = "X-AIvailable-Hop-Auth"
COUNT_HEADER = "X-AIvailable-Hops"
MAX_COUNT = 16
"""Largest hop counter accepted as well-formed (the router refuses to forward at far fewer, MAX_HOPS)."""
REQUEST_KEY = "aivailable.hop"
"""Where the API stores a request's `Received` (request[REQUEST_KEY]), verified once per request."""
_DOMAIN = b"aivailable hop v1"


@dataclass(frozen=True)
class Received:
    """What a request's hop headers say, once checked: `count` hops so far (0 unless `signed`)."""

    count: int = 0
    signed: bool = False


def parse_count(value: str | None) -> int:
    """The hop counter header's value (absent or empty: 0); InvalidRequest naming the header unless it is
    an integer from 0 to MAX_COUNT."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and int(text) <= MAX_COUNT):
        raise InvalidRequest(f"header {COUNT_HEADER} must be an integer from 0 to {MAX_COUNT}, "
                             f"got {value[:40]!r}", param=COUNT_HEADER)
    return int(text)


def of(request) -> Received:
    """The checked hop headers of an API request (a fresh client request when the API stored none)."""
    return request.get(REQUEST_KEY) or Received()


def _mac(secret: bytes, sender: str, ts_ms: int, nonce: str, path: str) -> str:
    msg = b"\n".join((_DOMAIN, sender.encode(), str(ts_ms).encode(), nonce.encode(), path.encode()))
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign(secret: bytes, sender: str, path: str, now: float) -> str:
    """The header value for one forwarded request."""
    ts_ms, nonce = round(now * 1000), secrets.token_hex(12)
    return f"{sender}.{ts_ms}.{nonce}.{_mac(secret, sender, ts_ms, nonce, path)}"


class HopVerifier:
    """Checks hop headers; each valid one is accepted once."""

    def __init__(self, secret: bytes, window: float = WINDOW_S, max_entries: int = 100_000):
        self.secret = secret
        self.window = window
        self.seen = ReplayCache(window, max_entries)

    def verify(self, value: str | None, path: str, now: float) -> bool:
        """True if `value` is a fresh, valid signature of a hop to `path` by a cluster member."""
        if not value or len(value) > 512:
            return False
        try:
            sender, ts_text, nonce, mac = value.rsplit(".", 3)
            ts_ms = int(ts_text)
        except ValueError:
            return False
        if not sender or not 8 <= len(nonce) <= 64 or abs(now - ts_ms / 1000) > self.window:
            return False
        if not hmac.compare_digest(mac, _mac(self.secret, sender, ts_ms, nonce, path)):
            return False
        return self.seen.check_and_add(sender, nonce, ts_ms / 1000, now)

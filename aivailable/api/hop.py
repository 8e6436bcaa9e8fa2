"""Signed hops: a node that forwards a client's request to a peer signs it with the cluster secret.

API-key rate limits count where a request enters the cluster. The hop counter header alone cannot
show that a request was forwarded, since any client can set it. So a forwarding node adds
`X-AIvailable-Hop-Auth: <sender>.<ts_ms>.<nonce>.<mac>`, an HMAC-SHA256 with the cluster secret over
the sender, the time, a fresh nonce and the path. The peer still checks the client's API key, but does
not charge its bucket a second time. A header that is missing, forged, outside the gossip time window or
replayed (nonces are remembered for the window) is ignored, and the request is charged as any client's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aivailable.gossip.envelope import WINDOW_S, ReplayCache

HEADER = "X-AIvailable-Hop-Auth"
_DOMAIN = b"aivailable hop v1"


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

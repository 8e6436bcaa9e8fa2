"""Per-API-key rate limits: one token bucket per key (sans-IO: the caller passes the time).

A key with limit `rpm` refills `rpm / 60` tokens a second into a bucket of `burst` tokens (default: a
minute's worth), and each request takes one. An empty bucket answers with the seconds until the next
token, which the API sends as `Retry-After` with a 429. Keys are identified in logs and metrics only by
:func:`fingerprint`, never by their text: an HMAC keyed with the cluster secret, so the fingerprints that
/metrics and /api/cluster show to anyone cannot be used to confirm a guessed key offline. Limits are per node: a client spreading requests over N nodes
gets up to N times the rate. A request counts once, on the node where it entered the cluster: the peer
it is forwarded to sees the forwarding node's signed hop header (api/hop.py) and does not charge it again.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

_DOMAIN = b"aivailable api-key fingerprint v1\n"


def fingerprint(key: str, secret: bytes) -> str:
    """A short id of an API key for logs, metrics and error messages: `key-` + 8 hex digits of
    HMAC-SHA256(cluster secret, key); the same on every node of a cluster, useless without the secret."""
    return "key-" + hmac.new(secret, _DOMAIN + key.encode(), hashlib.sha256).hexdigest()[:8]


@dataclass(slots=True)
class TokenBucket:
    rate_per_s: float
    capacity: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """Take one token: 0.0 if granted, else the seconds until one is available (nothing taken)."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.at) * self.rate_per_s)
        self.at = max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class KeyLimiter:
    """Buckets for every configured key. `default_rpm` 0 means unlimited; `overrides` maps key -> rpm
    (0: unlimited for that key); `burst` 0 means a minute's worth of requests."""

    def __init__(self, default_rpm: int = 0, overrides: dict[str, int] | None = None, burst: int = 0):
        self.default_rpm = default_rpm
        self.overrides = dict(overrides or {})
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def limit(self, key: str) -> int:
        """Requests per minute allowed for `key` (0 = unlimited)."""
        return self.overrides.get(key, self.default_rpm)

    def check(self, key: str, now: float) -> float:
        """0.0 if `key` may send a request now (and count it), else seconds to wait."""
        rpm = self.limit(key)
        if rpm <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            cap = float(self.burst or rpm)
            bucket = self._buckets[key] = TokenBucket(rpm / 60.0, cap, cap, now)
        return bucket.take(now)

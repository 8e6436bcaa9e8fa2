"""Suspicion timeout math (memberlist/Lifeguard) as pure functions, and one suspicion's state.

Every formula lives in exactly one function here; :mod:`membership`'s docs and the tests point at them.

* :func:`suspicion_timeout`: the *minimum* time a suspect stays suspect,
  ``mult * max(1, log10(max(1, n))) * interval``. The inner ``max(1, ...)`` keeps clusters under 10
  nodes at ``mult * interval`` instead of ~0 (memberlist's ``suspicionTimeout`` does the same).
* :func:`remaining_suspicion`: the timeout starts at ``max_timeout`` and shrinks towards ``min_timeout``
  as independent confirmations ``c`` arrive out of ``k`` expected:
  ``max - (max - min) * log(c + 1) / log(k + 1)``, never below ``min``, minus the time already elapsed.
* :func:`expected_confirmations`: ``k`` as configured (memberlist derives it as ``mult - 2``), but no
  more than the ``n - 2`` other nodes that could confirm; with ``k < 1`` the timer runs at ``min``.
* :func:`retransmit_limit`: how many times one update is piggybacked, ``mult * ceil(log10(n + 1))``.
* :func:`push_pull_scale`: memberlist's stretch of the full-sync interval above 32 nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def suspicion_timeout(mult: float, n: int, interval: float) -> float:
    """Minimum suspicion time in seconds for ``n`` live nodes and probe ``interval`` seconds."""
    node_scale = max(1.0, math.log10(max(1, n)))
    return mult * node_scale * interval


def expected_confirmations(k: int, n: int) -> int:
    """Independent confirmations to wait for (at most ``k``) before the timeout reaches its minimum."""
    return max(0, min(k, n - 2))


def remaining_suspicion(confirmations: int, k: int, elapsed: float, min_s: float, max_s: float) -> float:
    """Seconds left on a suspicion (may be negative: already expired)."""
    if k < 1:
        return min_s - elapsed
    frac = math.log(confirmations + 1) / math.log(k + 1)
    timeout = max(min_s, max_s - frac * (max_s - min_s))
    return timeout - elapsed


def retransmit_limit(mult: int, n: int) -> int:
    """Times one piggybacked update is sent before it is dropped from the queue."""
    return mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval: float, n: int) -> float:
    """Full-state sync interval: unchanged up to 32 nodes, then one more ``interval`` per doubling."""
    threshold = 32
    if n <= threshold:
        return interval
    return interval * (math.ceil(math.log2(n) - math.log2(threshold)) + 1)


@dataclass(slots=True)
class Suspicion:
    """One member under suspicion: who accused it, when, and when it will be declared dead."""

    start: float
    k: int
    min_s: float
    max_s: float
    accusers: set[str] = field(default_factory=set)
    deadline: float = 0.0

    @classmethod
    def begin(cls, accuser: str, now: float, k: int, min_s: float, max_s: float) -> Suspicion:
        s = cls(start=now, k=k, min_s=min_s, max_s=max_s, accusers={accuser})
        s.deadline = now + remaining_suspicion(0, k, 0.0, min_s, max_s)
        return s

    @property
    def confirmations(self) -> int:
        """Accusers besides the first one."""
        return len(self.accusers) - 1

    def confirm(self, accuser: str) -> bool:
        """Count an independent accuser; True if it was new (the update is then worth re-gossiping)."""
        if accuser in self.accusers or self.confirmations >= self.k:
            return False
        self.accusers.add(accuser)
        remaining = remaining_suspicion(self.confirmations, self.k, 0.0, self.min_s, self.max_s)
        self.deadline = self.start + remaining
        return True

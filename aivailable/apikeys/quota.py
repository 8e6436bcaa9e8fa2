"""Cluster-wide per-key rate limits (a key's ``rpm``), approximately: pure arithmetic, time passed in.

Every node counts, per limited key, the requests it admitted in the last ``WINDOW_S`` seconds
(:class:`WindowCounts`) and gossips those counts in its facts (``key_load``). A node admits a request of
key K when its own count plus the latest counts the other *alive* nodes reported is below K's rpm
(:func:`admit`). A request counts once, at the node where it entered the cluster (a forwarded request
carries a signed hop header and is not counted again).

**Bound on overshoot.** A node learns another node's count at most ``D`` seconds late, where ``D`` is the
gossip delay of facts (counters are sent at most once a second, ``cluster.py`` ``_facts_loop``, then
spread by gossip: about 1.5 s on a LAN profile, measured under 2 s on one host). Take any 60-s window
ending at t and the last request admitted in it, at node i and time s <= t. At s, node i knew every
request the other nodes admitted before s - D, and its own; it admitted only because all of those were
fewer than rpm. So the window holds at most::

    admitted <= rpm + sum over the other nodes j of A_j(D)

where ``A_j(D)`` is the most requests node j admits in any D seconds, itself at most ``min(rpm, r_j * D)``
for clients sending r_j requests/s to node j. With N nodes and clients sending r per node:
``admitted <= rpm + (N - 1) * min(rpm, r * D)`` (:func:`overshoot_bound`). One node alone (or all
traffic through one node) is exact. A node that cannot reach the others (partition) admits up to rpm on
its own side: availability before exactness, as everywhere in AIvailable.

The config-file limits (``rate_limit_rpm``, ``api_key_rpm``) are different: token buckets per node
(api/ratelimit.py), unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW_S = 60.0


def admit(own: int, others: Iterable[int], rpm: int) -> bool:
    """True when one more request fits: own count + the other nodes' latest counts < rpm (0 = no limit)."""
    return rpm <= 0 or own + sum(others) < rpm


def overshoot_bound(rpm: int, nodes: int, rate_per_node: float, delay_s: float) -> float:
    """The most requests the cluster admits in any WINDOW_S window (module docstring)."""
    return rpm + (nodes - 1) * min(float(rpm), rate_per_node * delay_s)


class WindowCounts:
    """Per key, the times of the requests this node admitted in the last WINDOW_S seconds."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._times.setdefault(key, deque())
        while q and q[0] <= now - WINDOW_S:
            q.popleft()
        return q

    def count(self, key: str, now: float) -> int:
        return len(self._trim(key, now))

    def note(self, key: str, now: float) -> None:
        self._trim(key, now).append(now)

    def retry_after(self, key: str, now: float, floor_s: float = 1.0) -> float:
        """Seconds until this node's oldest counted request leaves the window (at least `floor_s`: the
        others' counts fall as theirs leave it, which this node learns by gossip)."""
        q = self._trim(key, now)
        return max(floor_s, q[0] + WINDOW_S - now) if q else floor_s

    def counts(self, now: float) -> dict[str, int]:
        """{key: count} of every key with requests in the window (what a node gossips)."""
        out = {}
        for key in list(self._times):
            n = len(self._trim(key, now))
            if n:
                out[key] = n
            else:
                del self._times[key]
        return out

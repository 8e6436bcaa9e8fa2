"""Requests wait for a loading model (bounded), as pure decisions: who waits, who is served, who fails.

A request whose model has no reachable ready replica is not refused at once when the model is about to
serve: it is placed but loading (cold load, restart, re-placement, a file being copied), its holder just
failed (ready on a peer this node cannot reach yet, a worker restarting), no placement has arrived yet, or
it loads on demand (an offered file, a model unloaded after its keep-alive). Such a request waits at its
entry node, in a FIFO queue per model, for at most `load_wait_s`, then gets the 503 + Retry-After it would
have got at once. A model that is unplaced for another reason (no room, no holder of its file) gets a
short grace, the time for the coordinator to see the new demand, then fails.

Nothing is sent to the client while it waits, so a streaming client sees its first byte when generation
starts and an entry node can still fail over before it. The waiters of a model count against its replicas'
queue limit (`capacity`); a waiter whose client disconnects leaves the queue. The asyncio side (one loop in
the request handler, api/app.py) asks `WaitQueue.step` on every poll which waiters to release.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aivailable.keepalive import LOADS_ON_REQUEST

POLL_S = 0.25
"""How often waiting requests look at the cluster again (the cluster view changes at gossip pace)."""
UNPLACED_GRACE_S = 10.0
"""How long a request waits for an unplaced model that does not load on demand: the coordinator sees new
demand within a gossip round or two (about 1-2 s) and places the model if it can; after that the reason it
gives (no room, no holder of the file) is not going to change while a client waits."""
_ON_DEMAND_MARKS = (LOADS_ON_REQUEST, "loads on the first request")


class Verdict(Enum):
    SERVE = "serve"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class ModelStatus:
    """What the cluster view says about a model that has no reachable replica."""

    state: str
    """ready, loading, fetching, failed, placing or unplaced (clusterview._model_state)."""
    reason: str = ""
    restarting: bool = False
    """Some replica failed and its worker is being restarted (its supervisor always retries, with backoff)."""


def status_of(model: Mapping[str, Any] | None, planned: bool = True) -> ModelStatus:
    """The `ModelStatus` of one model entry of /api/cluster (`None`: not in the view yet)."""
    if not planned:
        return ModelStatus("placing", "no placement has reached this node yet")
    if model is None:
        return ModelStatus("placing", "not in the cluster view yet")
    restarting = any(r.get("state") == "failed" for r in model.get("replicas", ()))
    return ModelStatus(str(model.get("state", "unplaced")), str(model.get("reason") or ""), restarting)


def verdict(status: ModelStatus, *, reachable: bool, waited_s: float, load_wait_s: float) -> Verdict:
    """Serve a request that has waited `waited_s`, let it wait on, or fail it (with today's 503)."""
    if reachable:
        return Verdict.SERVE
    if waited_s >= load_wait_s:
        return Verdict.FAIL
    s = status.state
    if s in ("loading", "fetching", "placing", "ready"):  # "ready" unreachable: its holder is failing
        return Verdict.WAIT
    if s == "failed":
        return Verdict.WAIT if status.restarting else Verdict.FAIL
    if s == "unplaced":
        on_demand = any(mark in status.reason for mark in _ON_DEMAND_MARKS)
        return Verdict.WAIT if on_demand or waited_s < UNPLACED_GRACE_S else Verdict.FAIL
    return Verdict.FAIL


def capacity(spec: Mapping[str, Any], placed_replicas: int) -> int:
    """Most requests that may wait for a model at one entry node: what its replicas take at once (slots
    plus `max_queue` each), for its placed replicas (at least one)."""
    per_replica = int(spec.get("parallel", 1)) + int(spec.get("max_queue", 16))
    return max(1, per_replica * max(1, placed_replicas))


@dataclass(eq=False)
class Waiter:
    """One waiting request. `token` belongs to the caller (the asyncio side keeps its future there)."""

    model: str
    since: float
    seq: int
    token: Any = field(default=None, repr=False)


class WaitQueue:
    """FIFO queues of waiting requests per model, bounded by the caller's capacity. No I/O, no clock."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Waiter]] = {}
        self._seq = itertools.count()

    def join(self, model: str, now: float, limit: int, token: Any = None) -> Waiter | None:
        """Queue a request for `model`, or None when `limit` requests already wait for it."""
        q = self._queues.setdefault(model, deque())
        if len(q) >= limit:
            return None
        w = Waiter(model, now, next(self._seq), token)
        q.append(w)
        return w

    def leave(self, w: Waiter) -> None:
        """Remove a waiter (released, timed out, or its client disconnected); no-op if already gone."""
        q = self._queues.get(w.model)
        if q is None:
            return
        with contextlib.suppress(ValueError):
            q.remove(w)
        if not q:
            del self._queues[w.model]

    def first(self, model: str) -> Waiter | None:
        """The oldest waiter of `model` (the one that polls the cluster for all of them)."""
        q = self._queues.get(model)
        return q[0] if q else None

    def waiting(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def counts(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items()}

    def step(self, model: str, status: ModelStatus, *, reachable: bool, now: float,
             load_wait_s: float) -> list[tuple[Waiter, Verdict]]:
        """Decide for every waiter of `model`, oldest first; those served or failed leave the queue and are
        returned in arrival order (the caller wakes them in that order)."""
        q = self._queues.get(model)
        if not q:
            return []
        out = []
        for w in list(q):
            v = verdict(status, reachable=reachable, waited_s=now - w.since, load_wait_s=load_wait_s)
            if v is not Verdict.WAIT:
                out.append((w, v))
                self.leave(w)
        return out

"""Waiting for a loading model, as pure decisions (aivailable/api/loadwait.py)."""

from __future__ import annotations

import pytest

from aivailable.api.loadwait import (
    UNPLACED_GRACE_S,
    ModelStatus,
    Verdict,
    WaitQueue,
    capacity,
    status_of,
    verdict,
)
from aivailable.keepalive import LOADS_ON_REQUEST

S, W, F = Verdict.SERVE, Verdict.WAIT, Verdict.FAIL
IDLE = f"idle: no request for 5m (keep_alive); {LOADS_ON_REQUEST}"
OFFERED = "offered by a node's models directory; loads on the first request"
NO_ROOM = "no room: the GPUs that could hold its 900 MiB are taken by models with more demand"

# status, reachable, waited_s, load_wait_s -> verdict
CASES = [
    (ModelStatus("ready"), True, 0.0, 120.0, S),
    (ModelStatus("ready"), True, 500.0, 0.0, S),                      # a replica is there: always serve
    (ModelStatus("loading"), False, 0.0, 120.0, W),
    (ModelStatus("loading"), False, 119.9, 120.0, W),
    (ModelStatus("loading"), False, 120.0, 120.0, F),                 # bounded
    (ModelStatus("loading"), False, 0.0, 0.0, F),                     # load_wait_s = 0: today's 503
    (ModelStatus("fetching"), False, 30.0, 120.0, W),
    (ModelStatus("placing"), False, 30.0, 120.0, W),                  # no placement yet (election)
    (ModelStatus("ready"), False, 30.0, 120.0, W),                    # holder unreachable: failure in progress
    (ModelStatus("failed", "worker exited", restarting=True), False, 30.0, 120.0, W),
    (ModelStatus("failed", "could not fetch its file"), False, 0.0, 120.0, F),
    (ModelStatus("unplaced", IDLE), False, 60.0, 120.0, W),           # unloaded after keep_alive: reloads
    (ModelStatus("unplaced", OFFERED), False, 60.0, 120.0, W),        # on-demand load
    (ModelStatus("unplaced", NO_ROOM), False, 0.0, 120.0, W),         # the coordinator has not seen the demand
    (ModelStatus("unplaced", NO_ROOM), False, UNPLACED_GRACE_S, 120.0, F),
    (ModelStatus("unplaced", ""), False, UNPLACED_GRACE_S - 0.1, 120.0, W),
    (ModelStatus("unplaced", ""), False, UNPLACED_GRACE_S - 0.1, 5.0, F),
    (ModelStatus("something new"), False, 0.0, 120.0, F),
]


@pytest.mark.parametrize(("status", "reachable", "waited", "limit", "expected"), CASES)
def test_verdict(status, reachable, waited, limit, expected):
    assert verdict(status, reachable=reachable, waited_s=waited, load_wait_s=limit) is expected


def test_status_of_a_view_entry():
    assert status_of(None) == ModelStatus("placing", "not in the cluster view yet")
    assert status_of({"state": "ready"}, planned=False).state == "placing"
    entry = {"state": "failed", "reason": "boom", "replicas": [{"state": "failed"}, {"state": "lost"}]}
    assert status_of(entry) == ModelStatus("failed", "boom", restarting=True)
    assert status_of({"state": "failed", "reason": "x", "replicas": []}).restarting is False


@pytest.mark.parametrize(("spec", "replicas", "cap"), [
    ({}, 0, 17), ({}, 1, 17), ({}, 3, 51), ({"parallel": 4, "max_queue": 8}, 2, 24),
    ({"parallel": 1, "max_queue": 0}, 1, 1),
])
def test_capacity(spec, replicas, cap):
    assert capacity(spec, replicas) == cap


def test_queue_is_fifo_bounded_per_model_and_left_on_disconnect():
    q = WaitQueue()
    a, b, c = (q.join("m", t, 3) for t in (0.0, 1.0, 2.0))
    assert q.join("m", 3.0, 3) is None              # full: the caller answers as it did without waiting
    other = q.join("o", 0.0, 1)
    assert other is not None and q.counts() == {"m": 3, "o": 1}
    q.leave(b)                                      # its client disconnected
    q.leave(b)                                      # twice is harmless
    assert q.first("m") is a and q.waiting("m") == 2
    loading = ModelStatus("loading")
    assert q.step("m", loading, reachable=False, now=5.0, load_wait_s=120.0) == []
    released = q.step("m", ModelStatus("ready"), reachable=True, now=6.0, load_wait_s=120.0)
    assert released == [(a, S), (c, S)] and q.waiting("m") == 0 and q.first("m") is None
    assert q.counts() == {"o": 1}


def test_step_times_out_the_oldest_first_and_keeps_the_rest():
    q = WaitQueue()
    old, new = q.join("m", 0.0, 9), q.join("m", 50.0, 9)
    out = q.step("m", ModelStatus("loading"), reachable=False, now=120.0, load_wait_s=120.0)
    assert out == [(old, F)] and q.first("m") is new
    assert q.step("m", ModelStatus("failed", "bad file"), reachable=False, now=121.0, load_wait_s=120.0) == [(new, F)]
    assert q.step("nothing", ModelStatus("loading"), reachable=True, now=0.0, load_wait_s=1.0) == []

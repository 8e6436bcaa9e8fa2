"""Replica choice: power of two choices by load per slot, local first on ties, cooled-down peers last."""

from __future__ import annotations

import random
import time

from aivailable.api.router import Upstream, pick


def up(key: str, *, local: bool = False, slots: int = 1, outstanding: int = 0, reported: int = 0,
       cooldown: float = 0.0) -> Upstream:
    return Upstream(key, "m", lambda: None, "http://x", local, slots=slots, outstanding=outstanding,
                    reported_load=reported, cooldown_until=cooldown)


def test_two_candidates_pick_lower_load_per_slot():
    busy_small = up("a", local=True, slots=1, outstanding=1)
    roomy = up("b", slots=4, outstanding=2)
    assert pick([busy_small, roomy], random.Random(0), set()).key == "b"


def test_local_wins_ties_and_reported_load_counts():
    local, remote = up("l", local=True), up("r")
    assert all(pick([local, remote], random.Random(s), set()).key == "l" for s in range(20))
    assert pick([up("l", local=True, outstanding=1), up("r", reported=3)], random.Random(0), set()).key == "l"
    assert pick([up("l", local=True, outstanding=2), up("r", reported=1)], random.Random(0), set()).key == "r"


def test_excluded_and_cooling_down_replicas_are_avoided():
    hot = up("hot", cooldown=time.monotonic() + 60)
    ok = up("ok", outstanding=5)
    assert all(pick([hot, ok], random.Random(s), set()).key == "ok" for s in range(20))
    assert pick([hot, ok], random.Random(0), {"ok"}).key == "hot"  # better a cooling replica than none
    assert pick([hot, ok], random.Random(0), {"ok", "hot"}) is None


def test_load_spreads_over_many_replicas():
    ups = [up(f"u{i}") for i in range(8)]
    rng = random.Random(7)
    for _ in range(800):
        choice = pick(ups, rng, set())
        choice.outstanding += 1  # requests never finish: P2C must still keep loads close
    loads = sorted(u.outstanding for u in ups)
    assert loads[-1] - loads[0] <= 3, loads

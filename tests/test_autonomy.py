"""autonomy.decide: when a node serves on its own, what it loads, and when a coordinator's placement takes over."""

from __future__ import annotations

import pytest

from aivailable.autonomy import AutonomyConfig, Situation, decide, due, fit

CFG = AutonomyConfig(grace_s=10.0, stagger_s=3.0, retire_after_s=120.0)


def sit(**kw) -> Situation:
    base = dict(now=100.0, coordinator=None, changed_at=80.0, rank=0, demanded=frozenset({"m"}),
                served=frozenset(), free_mib={"g0": 4000.0}, needs_mib={"m": 1000.0})
    return Situation(**{**base, **kw})


@pytest.mark.parametrize("kw, want", [
    ({}, True),                                      # 20 s without a coordinator
    ({"changed_at": 95.0}, False),                   # only 5 s: within the grace period
    ({"coordinator": "n1"}, False),                  # a coordinator: its placement decides
    ({"rank": 3, "changed_at": 82.0}, False),        # rank 3 waits 10 + 3 x 3 s: 18 s are not enough
    ({"rank": 3, "changed_at": 80.0}, True),         # 20 s: its turn
    ({"rank": 4}, False),
])
def test_due(kw, want):
    assert due(sit(**kw), CFG) is want


def test_grace_zero_turns_it_off():
    assert not due(sit(), AutonomyConfig(grace_s=0))


@pytest.mark.parametrize("free, need, want", [
    ({"g0": 4000.0, "g1": 1500.0}, 1000.0, "g1"),  # tightest fit
    ({"g0": 900.0}, 1000.0, None),                 # nothing holds it
    ({"b": 2000.0, "a": 2000.0}, 1000.0, "a"),     # ties by id
])
def test_fit(free, need, want):
    assert fit(need, free) == want


def test_loads_a_demanded_unserved_model_on_own_gpu():
    d = decide(sit(), CFG)
    assert d.hold == {"m": "g0"} and "no coordinator for 20 s" in d.added["m"] and not d.retired


@pytest.mark.parametrize("kw", [
    {"served": frozenset({"m"})},        # a reachable node serves it (or loads it)
    {"demanded": frozenset()},           # nobody asked
    {"needs_mib": {}},                   # no estimate: cannot size it
    {"free_mib": {"g0": 500.0}},         # does not fit
    {"changed_at": 95.0},                # grace not over
])
def test_does_not_load(kw):
    assert decide(sit(**kw), CFG).hold == {}


def test_two_models_never_overbook_one_gpu():
    d = decide(sit(demanded=frozenset({"a", "b", "c"}), needs_mib={"a": 1500.0, "b": 1500.0, "c": 1500.0},
                   free_mib={"g0": 3200.0}), CFG)
    assert d.hold == {"a": "g0", "b": "g0"}  # the third does not fit in what is left


def test_keeps_its_replicas_while_leaderless():
    d = decide(sit(held={"m": "g0"}, served=frozenset({"m"})), CFG)
    assert d.hold == {"m": "g0"} and not d.added and not d.retired


@pytest.mark.parametrize("kw, why", [
    ({"placed_ready_elsewhere": frozenset({"m"})}, "serves m on another node"),
    ({"changed_at": -30.0}, "did not place it within 120 s"),
])
def test_retires_when_the_coordinator_takes_over(kw, why):
    s = sit(coordinator="n1", held={"m": "g0"}, **{"changed_at": 90.0, **kw})
    d = decide(s, CFG)
    assert d.hold == {} and why in d.retired["m"]


def test_keeps_it_while_the_returned_coordinator_has_not_replaced_it():
    d = decide(sit(coordinator="n1", changed_at=90.0, held={"m": "g0"}), CFG)
    assert d.hold == {"m": "g0"} and not d.retired


@pytest.mark.parametrize("coordinator", [None, "n1"])
def test_a_placement_that_needs_the_vram_wins_at_once(coordinator):
    d = decide(sit(coordinator=coordinator, held={"a": "g0", "b": "g0"}, needs_mib={"a": 1000.0, "b": 3000.0},
                   free_mib={"g0": -500.0}, placed_here={"other": ("g0",)}, demanded=frozenset()), CFG)
    assert d.evicted == {"a": "the placement needs the VRAM of g0"} and d.hold == {"b": "g0"} and not d.retired


def test_adopts_a_replica_the_placement_puts_on_the_same_gpu():
    d = decide(sit(coordinator="n1", held={"m": "g0"}, placed_here={"m": ("g0",)}), CFG)
    assert d.adopted == ("m",) and d.hold == {} and not d.retired


def test_no_coordinator_never_retires():
    d = decide(sit(held={"m": "g0"}, placed_ready_elsewhere=frozenset({"m"}), changed_at=-1000.0), CFG)
    assert d.hold == {"m": "g0"}

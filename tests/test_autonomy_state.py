"""AutonomousReplicas: the transitions AutonomyLoop makes, and the views the node reads (table tests)."""

from __future__ import annotations

import pytest

from aivailable.autonomy_state import AutonomousReplicas


def state(*ops: tuple) -> AutonomousReplicas:
    s = AutonomousReplicas()
    for name, *args in ops:
        getattr(s, name)(*args)
    return s


ADD_M = ("add", "m", "g0", "no coordinator")
"""m held on g0."""


@pytest.mark.parametrize("before, op, returns, held, retiring", [
    ((), ADD_M, None, {"m": "g0"}, {}),
    ((ADD_M,), ("add", "n", "g0", "why"), None, {"m": "g0", "n": "g0"}, {}),  # two models share a GPU
    ((ADD_M,), ("adopt", "m"), "g0", {}, {}),
    ((ADD_M,), ("evict", "m"), "g0", {}, {}),
    ((ADD_M,), ("retire", "m"), "g0", {}, {"m": "g0"}),
    ((ADD_M, ("retire", "m")), ("unloaded", "m", "g0"), True, {}, {}),
    ((ADD_M, ("retire", "m")), ("unloaded", "m", "g1"), False, {}, {"m": "g0"}),  # not the one retiring
    ((ADD_M,), ("unloaded", "m", "g0"), False, {"m": "g0"}, {}),                  # held, not retiring
    ((ADD_M, ("retire", "m")), ("add", "m", "g1", "again"), None, {"m": "g1"}, {"m": "g0"}),  # while one drains
    ((ADD_M, ("retire", "m"), ("add", "m", "g1", "w")), ("retire", "m"), "g1", {}, {"m": "g1"}),  # newest wins
])
def test_transitions(before, op, returns, held, retiring):
    s = state(*before)
    name, *args = op
    assert getattr(s, name)(*args) == returns
    assert s.held() == held and s.retiring() == retiring


@pytest.mark.parametrize("before, op", [
    ((), ("adopt", "m")),
    ((), ("evict", "m")),
    ((), ("retire", "m")),
    ((ADD_M, ("retire", "m")), ("retire", "m")),  # retiring is no longer held
    ((ADD_M,), ("add", "m", "g1", "twice")),
])
def test_illegal_transitions_raise_and_change_nothing(before, op):
    s = state(*before)
    held, retiring = s.held(), s.retiring()
    name, *args = op
    with pytest.raises(ValueError):
        getattr(s, name)(*args)
    assert s.held() == held and s.retiring() == retiring


@pytest.mark.parametrize("ops, model, devices, is_retiring, reason", [
    ((ADD_M,), "m", ("g0",), False, "no coordinator"),
    ((ADD_M,), "m", ("g0", "g1"), False, "no coordinator"),  # a replica on several GPUs, g0 among them
    ((ADD_M,), "m", ("g1",), False, None),                   # the placement's replica on another GPU
    ((ADD_M,), "n", ("g0",), False, None),
    ((ADD_M, ("retire", "m")), "m", ("g0",), True, None),
    ((ADD_M, ("retire", "m")), "m", ("g1",), False, None),
    ((ADD_M, ("retire", "m"), ("add", "m", "g1", "again")), "m", ("g1",), False, "again"),
    ((ADD_M, ("retire", "m"), ("add", "m", "g1", "again")), "m", ("g0",), True, None),
])
def test_views_of_one_replica(ops, model, devices, is_retiring, reason):
    s = state(*ops)
    assert s.is_retiring(model, devices) is is_retiring
    assert s.reason(model, devices) == reason


def test_serving_joins_held_and_retiring_and_views_are_copies():
    s = state(ADD_M, ("add", "n", "g1", "w"), ("retire", "n"), ("add", "n", "g2", "w2"), ("add", "k", "g3", "w3"))
    assert s.serving() == {"m": "g0", "n": "g1", "k": "g3"}  # retiring wins for n (as the node has done)
    assert s
    for view in (s.held(), s.retiring(), s.serving()):
        view.clear()
    assert s.held() == {"m": "g0", "n": "g2", "k": "g3"} and s.retiring() == {"n": "g1"}
    assert not AutonomousReplicas()

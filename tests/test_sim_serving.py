"""The simulator's serving checks (gossip/simserve.py): a minority serves on its own, never double-books a
GPU, and hands back to the coordinator's placement; and each check fails when the rule it guards is broken."""

from __future__ import annotations

from aivailable import autonomy
from aivailable.gossip.sim import SimConfig, run_seed

MAJORITY = SimConfig(nodes=5, schedule="majority")


def violations(cfg: SimConfig, seeds: range) -> list[str]:
    return [v for s in seeds for v in run_seed(s, cfg)["violations"]]


def test_majority_loss_is_served_by_the_minority_and_handed_back():
    results = [run_seed(s, MAJORITY) for s in range(4)]
    assert [v for r in results for v in r["violations"]] == []
    assert all(r["autonomous_loads"] > 0 for r in results)  # every run had models only on the crashed nodes
    assert all(r["handbacks_s"] for r in results)
    assert max(h for r in results for h in r["handbacks_s"]) < 30


def test_random_faults_keep_every_serving_invariant():
    assert violations(SimConfig(nodes=5), range(3)) == []


def test_overbooking_is_caught(monkeypatch):
    monkeypatch.setattr(autonomy, "fit", lambda need, free: next(iter(free)))  # ignores free VRAM
    found = violations(MAJORITY, range(4))
    assert any("MiB of 8000" in v for v in found), found[:3]


def test_a_minority_that_never_serves_is_caught(monkeypatch):
    monkeypatch.setattr(autonomy, "due", lambda s, cfg: False)
    found = violations(MAJORITY, range(2))
    assert any("nobody it reaches serves" in v for v in found), found[:3]


def test_replicas_that_are_never_handed_back_are_caught(monkeypatch):
    monkeypatch.setattr(autonomy, "retire_reason", lambda model, gpu, s, cfg: None)
    found = violations(MAJORITY, range(2))
    assert any("outlive the whole cluster" in v or "left after healing" in v for v in found), found[:3]


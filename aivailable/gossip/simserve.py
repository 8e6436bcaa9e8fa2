"""Serving in the simulator: each SimNode runs the production autonomy rule (aivailable/autonomy.py) on what
its own core knows, as aivailable/autonomy_loop.py does in a real node, and the checks of what it must achieve.

Model sizes and one GPU per node are fixed here; in the simulator a placed replica is ready as soon as its
node applies the placement, and an autonomous one as soon as it is decided. A node's autonomous replicas are
process memory (lost in a crash) and part of its gossiped facts (``autonomous``), so peers count them as
served once gossip brings them.

Checks (``ServingCheck``):

- **no double booking**: on every up node, the placement's share plus its autonomous replicas never exceed the
  GPU while any autonomous replica runs there (the placement alone is the stand-in solver's business);
- **a minority serves**: once the network and the set of up nodes have been stable for ``STABLE_S``, an up
  node without a coordinator for that long finds every demanded model that would fit in its own free VRAM
  served by an up node it can reach;
- **hand-back**: once every node is up and the network whole, every autonomous replica is gone within
  ``HANDBACK_S`` (an election, a placement delivery and at most ``retire_after_s``; the report gives the
  times measured), and none is left at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aivailable.autonomy import AutonomyConfig, Situation, decide

if TYPE_CHECKING:
    from aivailable.gossip.sim import Sim
    from aivailable.gossip.simnode import SimNode

GPU = "gpu0"
CAPACITY_MIB = 8000.0
NEEDS_MIB = {"gemma-3-270m": 1000.0, "llama-3.2-1b": 3000.0, "qwen2.5-7b": 6000.0}
"""Not all three fit on one GPU: a lone node serves what fits, two nodes of a minority serve everything."""
SIM_AUTONOMY = AutonomyConfig(grace_s=10.0, stagger_s=3.0, retire_after_s=15.0)
STABLE_S = 30.0
HANDBACK_S = 30.0
"""Bound on autonomous replicas outliving a whole cluster: election (~3 s), placement, retire_after_s (15 s)."""
"""Network and up-set unchanged this long: detection (dead after ~10 s), grace, stagger and gossip are over."""


def placed_on(assignments: dict[str, Any], node: str) -> dict[str, tuple[str, ...]]:
    """The stand-in placement's models on `node` -> their GPUs."""
    return {m: (a.get("gpu", GPU),) for m, a in assignments.items() if a.get("node") == node}


def booked(node: SimNode) -> float:
    """MiB the placement's share and the autonomous replicas of `node` take on its GPU."""
    models = set(placed_on(node.applied, node.id)) | set(node.autonomous)
    return sum(NEEDS_MIB.get(m, 0.0) for m in models)


@dataclass
class Autonomy:
    """One SimNode's autonomy driver state (process memory: a crash loses it)."""

    coordinator: str | None = None
    changed_at: float = 0.0

    def situation(self, node: SimNode, now: float, demand: list[str]) -> Situation:
        core = node.core
        live = set(core.mem.live_members())
        leader = core.leader if core.leader is not None and (core.leader == node.id or core.leader in live) else None
        if leader != self.coordinator:
            self.coordinator, self.changed_at = leader, now
        peers = sorted(live | {node.id})
        served = set(node.autonomous) | set(placed_on(node.applied, node.id))
        ready_elsewhere = set()
        for n in live - {node.id}:  # what peers serve, as their gossiped facts say (as a real node sees it)
            facts = core.mem.facts(n)
            if facts is None:
                continue
            theirs = set(facts[1].get("serving", ()))
            served |= theirs
            ready_elsewhere |= {m for m in theirs if node.applied.get(m, {}).get("node") == n}
        free = CAPACITY_MIB - sum(NEEDS_MIB.get(m, 0.0) for m in set(placed_on(node.applied, node.id))
                                  | set(node.autonomous))
        return Situation(now=now, coordinator=leader, changed_at=self.changed_at, rank=peers.index(node.id),
                         demanded=frozenset(demand), served=frozenset(served), free_mib={GPU: free},
                         needs_mib=NEEDS_MIB, held=dict(node.autonomous),
                         placed_here=placed_on(node.applied, node.id),
                         placed_ready_elsewhere=frozenset(ready_elsewhere))

    def step(self, node: SimNode, now: float, demand: list[str], cfg: AutonomyConfig = SIM_AUTONOMY) -> bool:
        """Decide and apply (instantly: the simulator has no load times); True when the set changed."""
        d = decide(self.situation(node, now, demand), cfg)
        if d.hold == node.autonomous:
            return False
        node.autonomous = dict(d.hold)
        node.sim.serving.autonomous_loads += len(d.added)
        node.sim.log(f"{node.id} autonomous {sorted(d.hold)} (+{sorted(d.added)} -{sorted(d.retired)})")
        return True


@dataclass
class ServingCheck:
    """The serving invariants over a run (see the module docstring)."""

    violations: list[str] = field(default_factory=list)
    last_change: float = 0.0
    autonomous_loads: int = 0
    unserved_samples: int = 0
    handbacks_s: list[float] = field(default_factory=list)
    """Per episode: seconds from the cluster becoming whole (all up, no partition) to no autonomous replica."""
    leaderless_s: float = 0.0
    """Sampled time (0.1 s steps) in which no up node led: nobody could place anything."""
    _whole_since: float | None = None
    _pending: bool = False

    def changed(self, now: float) -> None:
        """The network or the set of up nodes changed."""
        self.last_change = now

    def sample(self, sim: Sim, step: float = 0.1) -> None:
        up = [n for n in sim.nodes.values() if n.up]
        if not any(n.elect is not None and n.elect.is_leader for n in up):
            self.leaderless_s += step
        for n in up:
            if n.autonomous and booked(n) > CAPACITY_MIB:
                self._fail(sim.now, f"{n.id} books {booked(n):.0f} MiB of {CAPACITY_MIB:.0f} on {GPU} "
                                    f"(autonomous {sorted(n.autonomous)}, placed {sorted(placed_on(n.applied, n.id))})")
        if sim.now - self.last_change >= STABLE_S:
            for n in up:
                if n.serving.coordinator is not None or sim.now - n.serving.changed_at < STABLE_S:
                    continue
                reach = [o for o in up if sim.net.connected(n.id, o.id)]
                served = {m for o in reach for m in (*placed_on(o.applied, o.id), *o.autonomous)}
                free = CAPACITY_MIB - booked(n)
                missing = sorted(m for m in set(sim.cfg.demand) - served if NEEDS_MIB.get(m, 0.0) <= free)
                if missing:
                    self.unserved_samples += 1
                    self._fail(sim.now, f"{n.id} has had no coordinator for {sim.now - n.serving.changed_at:.0f} s "
                                        f"and nobody it reaches serves {missing}")
        self._handback(sim, up)

    def _handback(self, sim: Sim, up: list[SimNode]) -> None:
        if len(up) < len(sim.nodes) or sim.net.group:
            self._whole_since, self._pending = None, False
            return
        held = any(n.autonomous for n in up)
        if self._whole_since is None:
            self._whole_since, self._pending = sim.now, held
        if not self._pending:
            return
        took = sim.now - self._whole_since
        if not held:
            self.handbacks_s.append(round(took, 3))
            self._pending = False
        elif took > HANDBACK_S:
            self._pending = False
            self._fail(sim.now, f"autonomous replicas outlive the whole cluster by {took:.0f} s: "
                                f"{ {n.id: sorted(n.autonomous) for n in up if n.autonomous} }")

    def finish(self, sim: Sim) -> None:
        left = {n.id: sorted(n.autonomous) for n in sim.nodes.values() if n.up and n.autonomous}
        if left:
            self._fail(sim.now, f"autonomous replicas left after healing: {left}")

    def _fail(self, now: float, what: str) -> None:
        if len(self.violations) < 20 and not any(v.endswith(what) for v in self.violations):
            self.violations.append(f"t={now:.1f}s: {what}")

"""One simulated node (:mod:`aivailable.gossip.sim`): the production node core driven as the transport
drives it, with a stand-in coordinator and the autonomy rule (:mod:`aivailable.gossip.simserve`)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from aivailable.gossip.election import BecameLeader, ElectionCore, HardState
from aivailable.gossip.fencing import PlacementFence
from aivailable.gossip.membership import MemberChanged, MembershipCore
from aivailable.gossip.messages import PlacementPublish
from aivailable.gossip.node_core import NodeCore, Note, PlacementApplied, PlacementRefused
from aivailable.gossip.simserve import Autonomy

if TYPE_CHECKING:
    from aivailable.gossip.sim import Sim

__all__ = ["SimNode"]


class SimNode:
    """One node driven as the transport drives it: the production :class:`NodeCore`, its Ready persisted
    (hard state, placement: all a restart keeps) before its messages leave, send outcomes reported back."""

    def __init__(self, sim: Sim, node_id: str, voters: tuple[str, ...], seeds: list[str] | None = None):
        self.sim, self.id, self.up = sim, node_id, True
        self.seeds = list(seeds or [])
        self.disk: HardState | None = None
        self.disk_placement: tuple[int, int, dict[str, Any]] | None = None
        self.applied: dict[str, Any] = {}
        self.autonomous: dict[str, str] = {}
        self.serving = Autonomy(changed_at=sim.now)
        self.gen = 0  # bumped per (re)start: send outcomes for an older incarnation are dropped
        self.next_publish = 0.0
        self.next_facts = sim.rng.uniform(0, sim.cfg.facts_interval)
        self._start(voters)

    def _start(self, voters: tuple[str, ...]) -> None:
        sim, now = self.sim, self.sim.now
        self.started_at = now
        self.autonomous, self.serving = {}, Autonomy(changed_at=now)  # process memory: gone in a crash
        self.gen += 1
        self.core = NodeCore(
            self.id, self.id, sim.core_cfg, random.Random(sim.rng.random()), now,
            hard_state=self.disk, placement=self.disk_placement, voters=voters,
        )
        self.core.set_facts(self._facts(), now)
        self.core.start(now)

    @property
    def mem(self) -> MembershipCore:
        return self.core.mem

    @property
    def elect(self) -> ElectionCore:
        return self.core.elect

    @property
    def fence(self) -> PlacementFence:
        return self.core.fence

    def _facts(self) -> dict[str, Any]:
        free = 8000 + (sum(map(ord, self.id)) * 997) % 16000
        queue = self.sim.rng.randrange(8)
        return {"devices": [{"id": "gpu0", "total": 24000, "free": free}], "queue": queue, "backend": "sim",
                "autonomous": sorted(self.autonomous), "serving": sorted(set(self.autonomous) | {
                    m for m, a in self.applied.items() if a.get("node") == self.id})}

    def _serve(self, now: float, placed: bool = False) -> None:
        """The autonomy rule, as the real node's autonomy loop runs it; changed replicas are gossiped at once."""
        if self.sim.cfg.autonomy and (self.serving.step(self, now, self.sim.cfg.demand) or placed):
            self.core.set_facts(self._facts(), now)

    def crash(self) -> None:
        self.up = False

    def restart(self, seeds: list[str]) -> None:
        self.up = True
        self._start(())
        self.core.join(seeds, self.sim.now)
        self.drain()

    def tick(self, now: float) -> None:
        self.core.tick(now)
        self._serve(now)
        if self.sim.cfg.election and self.core.is_leader and now >= self.next_publish:
            self.next_publish = now + self.sim.cfg.publish_interval
            self._publish(now)
        if now >= self.next_facts and now < self.sim.facts_until:
            self.next_facts = now + self.sim.cfg.facts_interval
            self.core.set_facts(self._facts(), now)
        self.drain()

    def deliver(self, src: str, msg: Any) -> None:
        self.core.step(src, msg, self.sim.now)
        self.drain()

    def report(self, gen: int, ack: Any, ok: bool) -> None:
        """The outcome of a send of incarnation ``gen`` (a 2xx answer, or none within the send timeout)."""
        if self.up and gen == self.gen:
            self.core.delivered(ack, ok, self.sim.now)
            self.drain()

    def drain(self) -> None:
        sim, now = self.sim, self.sim.now
        while self.core.has_ready():
            rd = self.core.ready()
            if rd.hard_state is not None:
                self.disk = rd.hard_state
                sim.check.persisted(self.id, rd.hard_state)
            if rd.placements:
                self.disk_placement = rd.placements[-1]
            self.core.advance()
            for out in rd.messages:
                sim.send(self.id, out.addr, out.msg, out.ack, self.gen)
            for ev in rd.events:
                self._on_event(ev, now)

    def _on_event(self, ev: Any, now: float) -> None:
        check = self.sim.check
        match ev:
            case MemberChanged():
                check.member_changed(self.id, ev, now, self.sim)
            case BecameLeader():
                check.became_leader(self.id, ev, now, self.sim.net)
            case PlacementApplied():
                self.applied = ev.assignments
                self._serve(now, placed=True)  # before anything loads: a placement on its GPU retires an autonomous one
                msg = PlacementPublish(term=ev.term, version=ev.version, assignments=ev.assignments)
                check.applied(self.id, ev.src, msg, ev.node_term, now)
            case PlacementRefused(stale=True):
                check.stale_refused += 1  # a deposed leader's placement, stopped by the fence
            case PlacementRefused():
                check.placements_refused += 1  # a repeat of one already applied
            case Note() if ev.text.startswith("bootstrapped"):
                check.founded(self.id, now)
                self.sim.log(f"{self.id} {ev.text}")

    def _publish(self, now: float) -> None:
        live = self.core.mem.live_members()
        view = {n: (self.core.mem.facts(n) or (0, {}))[1] for n in live}
        assignments = self.sim.cfg.place_fn(view, self.sim.cfg.demand, self.applied)
        p = self.core.published
        if p is None or p.term != self.core.term or p.assignments != assignments:
            self.core.publish_placement(assignments, now)

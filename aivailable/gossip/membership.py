"""Sans-IO SWIM membership with suspicion, incarnations, and piggybacked per-node facts.

Driver contract (the transport is the driver; nothing here does I/O, reads a clock or global random)::

    core = MembershipCore(node_id, addr, MembershipConfig.lan(), random.Random(seed), now)
    core.join(seed_addrs)                   # optional: full-state sync with seeds
    loop:
        core.tick(now)                      # every ~50 ms (finer than any interval below)
        core.step(src, msg, now)            # src = authenticated envelope sender
        core.set_facts(facts)               # whenever this node's facts change
        rd = core.ready()                   # Ready(messages, events, persist=None)
        send rd.messages; handle rd.events; core.advance()

Nothing of membership is persisted: a restarted node comes back with incarnation 0, learns its old
incarnation from peers (sync or gossip) and refutes with a higher one; the same for its facts version.

Protocol (hashicorp/memberlist's SWIM + Lifeguard, rewritten as one state machine):

* Every ``probe_interval`` (times the local-health multiplier, 1..``awareness_max``) ping the next
  member of a round-robin list kept in one random order (a member accused by others is probed next).
  No ack after ``probe_timeout`` -> ask ``indirect_checks`` random members to ping it (:class:`PingReq`;
  they forward the ack, or a :class:`Nack` if the target stays silent). No ack by the end of the
  interval -> the target becomes *suspect*.
* A suspect is declared *dead* when its :class:`~aivailable.gossip.suspicion.Suspicion` timer runs out;
  the timer shrinks from ``max`` to ``min`` with independent accusers (formulas: ``suspicion.py``).
* A node that hears it is suspect or dead refutes by gossiping :class:`Alive` with a higher incarnation.
  At equal incarnation dead beats suspect beats alive.
* Dead members are still gossiped to for ``gossip_to_dead``, and every ``reconnect_interval`` one of
  them is pinged: if it answers, it gets our full state, learns it was declared dead and refutes (this
  heals partitions). They are forgotten (``MemberChanged(new=None)``) after ``reap_timeout``. Every
  ``reconnect_interval`` a node re-pushes its state to each join seed that has neither answered
  (:meth:`MembershipCore.seed_answered`, fed by the driver) nor shows up as a live member's address;
  a node that knows no live peer re-pushes to all of them. So a seed that was not up yet when this
  node started is reached once it is, even if other peers found this node first: without that, two
  groups that started apart would never learn of each other.
* Updates (alive/suspect/dead/facts) ride on every ping, ack and ping-req, plus a :class:`Gossip` to
  ``gossip_nodes`` random members every ``gossip_interval``, each update ``retransmit_limit`` times;
  membership changes take the byte budget first, facts get the rest (``broadcast.py``).
* Every ``push_pull_interval`` (stretched above 32 nodes) a full :class:`Sync` with one random member,
  dead ones included; a remote *dead* is merged as *suspect* (memberlist's rule: never kill on hearsay).
* Facts are opaque: ``set_facts(dict)`` bumps this node's facts version; a higher version wins.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from aivailable.gossip.broadcast import BroadcastQueue
from aivailable.gossip.members import LIVE, Member, MemberChanged, MemberTable
from aivailable.gossip.membership_types import FactsChanged, MembershipConfig, Refuted
from aivailable.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Facts,
    Gossip,
    MemberState,
    Nack,
    Ping,
    PingReq,
    Ready,
    Send,
    Status,
    Suspect,
    Sync,
)
from aivailable.gossip.suspicion import (
    Suspicion,
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_timeout,
)

__all__ = ["Member", "MemberChanged", "MembershipCore"]


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    timeout_at: float
    end_at: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


class MembershipCore:
    """One node's SWIM state machine. See the module docstring for the driver contract."""

    def __init__(self, node_id: str, addr: str, config: MembershipConfig, rng: random.Random, now: float):
        self.id = node_id
        self.addr = addr
        self.cfg = config.validate()
        self.rng = rng
        self.incarnation = 0
        self.facts_version = 0
        self.own_facts: dict[str, Any] = {}
        self.leaving = False
        self.health = 0  # Lifeguard local health: probe interval and timeout scale by health + 1
        self._out: list[Send] = []
        self._events: list[Any] = []
        self._t = MemberTable(rng, self._events)
        self._state_q = BroadcastQueue()  # alive/suspect/dead: always first in the budget
        self._facts_q = BroadcastQueue()  # facts: fill what the budget has left
        self._seq = 0
        self._probe_order: list[str] = []
        self._probe_pos = 0
        self._probe: _Probe | None = None
        self._forwards: dict[int, tuple[str, int, float]] = {}  # local seq -> (origin, origin seq, deadline)
        self._reconnects: dict[int, str] = {}  # seq of a ping to a dead member -> that member
        self._seeds: list[str] = []
        self._seeds_answered: dict[str, float] = {}  # seed address -> when it first answered a push
        self._next_probe = now + rng.uniform(0, config.probe_interval)
        self._next_gossip = now + rng.uniform(0, config.gossip_interval)
        self._next_reconnect = now + rng.uniform(0.5, 1.0) * config.reconnect_interval
        self._next_sync = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._enqueue(self._own_alive())

    # ---- queries -------------------------------------------------------------------------------------

    def status(self, node: str) -> Status | None:
        if node == self.id:
            return Status.LEFT if self.leaving else Status.ALIVE
        m = self._t.get(node)
        return m.status if m else None

    def member(self, node: str) -> Member | None:
        return self._t.get(node)

    def live_members(self) -> list[str]:
        """Alive and suspect members, this node included, sorted."""
        return sorted([self.id, *(n for n, m in self._t.members.items() if m.status in LIVE)])

    def known_members(self) -> list[str]:
        return sorted(self._t.members)

    def num_live(self) -> int:
        return self._t.n_live

    def facts(self, node: str) -> tuple[int, dict[str, Any]] | None:
        """``(version, facts)`` last heard for ``node`` (own facts for this node)."""
        if node == self.id:
            return (self.facts_version, self.own_facts)
        return self._t.facts.get(node)

    def full_state(self) -> tuple[MemberState, ...]:
        """Every member as this node sees it, itself first (what a :class:`Sync` carries)."""
        return self._full_state()

    def pending_updates(self) -> int:
        return len(self._state_q) + len(self._facts_q)

    # ---- driver API ----------------------------------------------------------------------------------

    def ready(self) -> Ready:
        return Ready(messages=tuple(self._out), events=tuple(self._events))

    def has_ready(self) -> bool:
        return bool(self._out or self._events)

    def advance(self) -> None:
        self._out.clear()
        self._events.clear()

    def join(self, addrs: list[str]) -> None:
        """Push our full state to each seed address; their replies fill in the cluster. Retried every
        ``reconnect_interval`` to each seed that has not answered (:meth:`seed_answered`) and is not a
        live member's address, and to all of them while this node knows no live peer."""
        self._seeds = [a for a in addrs if a != self.addr]
        for addr in self._seeds:
            self._out.append(Send("", Sync(members=self._full_state()), addr=addr))

    def seed_answered(self, addr: str, now: float) -> None:
        """The driver's word that a node at seed ``addr`` accepted our push (a 2xx answer)."""
        if addr in self._seeds:
            self._seeds_answered.setdefault(addr, now)

    def unreached_seeds(self, now: float, settle: float = 0.0) -> list[str]:
        """Seeds, in join order, that are not the address of a live member and have not answered at least
        ``settle`` before ``now`` (its reply may still be on the way)."""
        live = {m.addr for m in self._t.members.values() if m.status in LIVE}
        return [a for a in self._seeds
                if a not in live and now - self._seeds_answered.get(a, math.inf) < settle]

    def set_facts(self, facts: dict[str, Any]) -> int:
        """Publish this node's facts (the core never looks inside); returns the new version."""
        self.facts_version += 1
        self.own_facts = facts
        self._enqueue(Facts(node=self.id, version=self.facts_version, facts=facts))
        return self.facts_version

    def leave(self) -> None:
        """Announce a graceful leave; keep ticking a few gossip intervals so it spreads, then stop."""
        self.leaving = True
        self._enqueue(Dead(node=self.id, incarnation=self.incarnation, accuser=self.id))

    def seed_members(self, rows: list[MemberState], now: float) -> None:
        """Start from a known membership (a restored snapshot, a simulator's warm start): no events."""
        for row in rows:
            if row.node != self.id and self._t.get(row.node) is None and row.status in LIVE:
                self._add(row.node, row.addr, row.incarnation, now)
                if row.facts is not None:
                    self._t.facts[row.node] = (row.facts_version, row.facts)
        self._events.clear()

    def drop_pending(self) -> None:
        """Forget queued updates (after :meth:`seed_members` of a cluster that already agrees)."""
        self._state_q.clear()
        self._facts_q.clear()

    def step(self, src: str, msg: Any, now: float) -> None:
        """Handle one message from authenticated sender ``src``."""
        match msg:
            case Ping():
                self._apply_all(msg.updates, now)
                if msg.target == self.id:
                    self._send(src, Ack(seq=msg.seq, updates=self._piggyback()))
            case Ack():
                self._apply_all(msg.updates, now)
                self._on_ack(msg.seq)
                if self._reconnects.pop(msg.seq, None) == src and self.status(src) not in LIVE:
                    self._send(src, Sync(members=self._full_state()))  # it lives: tell it it is dead
            case PingReq():
                self._apply_all(msg.updates, now)
                if self._t.get(msg.target) is not None:
                    self._seq += 1
                    self._forwards[self._seq] = (src, msg.seq, now + self.cfg.probe_timeout)
                    self._send(msg.target, Ping(seq=self._seq, target=msg.target, updates=self._piggyback()))
            case Nack():
                if self._probe is not None and self._probe.seq == msg.seq:
                    self._probe.nacks += 1
            case Gossip():
                self._apply_all(msg.updates, now)
            case Sync():
                self._merge(src, msg.members, now)
                if not msg.reply and self._t.get(src) is not None:
                    self._send(src, Sync(members=self._full_state(), reply=True))
            case _:
                raise TypeError(f"membership cannot step {type(msg).__name__}")

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        cfg, t = self.cfg, self._t
        scale = self.health + 1
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.timeout_at:
            self._send_indirect(probe, now)
        if probe is not None and now >= probe.end_at:
            self._probe_failed(probe, now)
        if self._probe is None and now >= self._next_probe:
            self._next_probe = now + cfg.probe_interval * scale
            self._start_probe(now, scale)
        if self._forwards:
            for seq, (origin, origin_seq, deadline) in list(self._forwards.items()):
                if now >= deadline:
                    del self._forwards[seq]
                    self._send(origin, Nack(seq=origin_seq))
        for m in [m for m in t.suspects.values() if m.suspicion and now >= m.suspicion.deadline]:
            self._on_dead(m.node, m.incarnation, self.id, now)
        for m in [m for m in t.dead.values() if now - m.since >= cfg.reap_timeout]:
            t.remove(m.node)
        if now >= self._next_gossip:
            self._next_gossip = max(self._next_gossip + cfg.gossip_interval, now)
            if self._state_q or self._facts_q:
                for peer in t.random_ids(cfg.gossip_nodes, now, dead_for=cfg.gossip_to_dead):
                    self._send(peer, Gossip(updates=self._piggyback()))
        if now >= self._next_reconnect:
            self._next_reconnect = now + cfg.reconnect_interval
            self._reconnect(now)
        if now >= self._next_sync:
            self._next_sync = now + push_pull_scale(cfg.push_pull_interval, t.n_live)
            peers = t.random_ids(1, now, dead_for=cfg.reap_timeout)
            if peers:
                self._send(peers[0], Sync(members=self._full_state()))

    # ---- probing -------------------------------------------------------------------------------------

    def _start_probe(self, now: float, scale: int) -> None:
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        self._probe = _Probe(
            seq=self._seq,
            target=target,
            timeout_at=now + self.cfg.probe_timeout * scale,
            end_at=now + self.cfg.probe_interval * scale,
        )
        self._send(target, Ping(seq=self._seq, target=target, updates=self._piggyback()))

    def _next_target(self) -> str | None:
        for _ in range(2):
            while self._probe_pos < len(self._probe_order):
                m = self._t.get(self._probe_order[self._probe_pos])
                self._probe_pos += 1
                if m is not None and m.status in LIVE:
                    return m.node
            # Keep one random order (new members are inserted at random places): every live member is
            # probed once per round, and never waits up to two rounds as with a reshuffle per round.
            order = list(dict.fromkeys(n for n in self._probe_order if self._t.get(n)))
            if not order:
                order = sorted(self._t.members)
                self.rng.shuffle(order)
            self._probe_order, self._probe_pos = order, 0
        return None

    def _send_indirect(self, probe: _Probe, now: float) -> None:
        probe.indirect_sent = True
        helpers = [p for p in self._t.random_ids(self.cfg.indirect_checks + 1, now) if p != probe.target]
        helpers = helpers[: self.cfg.indirect_checks]
        probe.expected_nacks = len(helpers)
        for peer in helpers:
            self._send(peer, PingReq(seq=probe.seq, target=probe.target, updates=self._piggyback()))

    def _on_ack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            self._probe = None
            self.health = max(0, self.health - 1)
        elif seq in self._forwards:
            origin, origin_seq, _ = self._forwards.pop(seq)
            self._send(origin, Ack(seq=origin_seq))

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        """No ack in the whole interval. Missing nacks (or no helpers) hint that *we* are the problem."""
        self._probe = None
        missing = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
        self.health = min(self.cfg.awareness_max - 1, self.health + max(0, missing))
        m = self._t.get(probe.target)
        if m is not None and m.status in LIVE:
            self._on_suspect(m.node, m.incarnation, self.id, now)

    def _reconnect(self, now: float) -> None:
        """Partition healing: ping a random recently-dead member; re-push to the seeds not reached yet
        (all of them while alone)."""
        self._reconnects.clear()
        if self._t.n_live == 1:
            self._seeds_answered.clear()
        unreached = self.unreached_seeds(now)
        if unreached:
            push = Sync(members=self._full_state())
            self._out.extend(Send("", push, addr=addr) for addr in unreached)
        window = self.cfg.gossip_to_dead
        dead = [n for n, m in self._t.dead.items() if m.status is Status.DEAD and now - m.since < window]
        if dead:
            node = dead[self.rng.randrange(len(dead))]
            self._seq += 1
            self._reconnects[self._seq] = node
            self._send(node, Ping(seq=self._seq, target=node))

    # ---- state updates (the SWIM rules) --------------------------------------------------------------

    def _apply_all(self, updates: tuple[Any, ...], now: float) -> None:
        for u in updates:
            match u:
                case Alive():
                    self._on_alive(u.node, u.incarnation, u.addr, now)
                case Suspect():
                    self._on_suspect(u.node, u.incarnation, u.accuser, now)
                case Dead():
                    self._on_dead(u.node, u.incarnation, u.accuser, now)
                case Facts():
                    self._on_facts(u.node, u.version, u.facts)

    def _on_alive(self, node: str, inc: int, addr: str, now: float) -> None:
        if node == self.id:
            if inc > self.incarnation and not self.leaving:  # peers knew a later incarnation (we restarted)
                self._refute(inc)
            return
        m = self._t.get(node)
        if m is None:
            self._add(node, addr, inc, now)
        elif inc > m.incarnation:
            old = m.status
            m.incarnation, m.addr, m.suspicion = inc, addr, None
            if old is not Status.ALIVE:
                self._t.set_status(m, Status.ALIVE, now)
        else:
            return
        self._enqueue(Alive(node=node, incarnation=inc, addr=addr))

    def _on_suspect(self, node: str, inc: int, accuser: str, now: float) -> None:
        if node == self.id:
            if inc >= self.incarnation and not self.leaving:
                self.health = min(self.cfg.awareness_max - 1, self.health + 1)
                self._refute(inc)
            return
        m = self._t.get(node)
        if m is None or inc < m.incarnation or m.status not in LIVE:
            return
        if m.status is Status.SUSPECT and m.suspicion is not None:
            newer = inc > m.incarnation
            m.incarnation = inc
            if m.suspicion.confirm(accuser) or newer:
                self._enqueue(Suspect(node=node, incarnation=inc, accuser=accuser))
            return
        m.incarnation = inc
        n = self._t.n_live
        min_s = suspicion_timeout(self.cfg.suspicion_mult, n, self.cfg.probe_interval)
        max_s = self.cfg.suspicion_max_timeout_mult * min_s
        k = expected_confirmations(self.cfg.suspicion_confirmations, n)
        m.suspicion = Suspicion.begin(accuser, now, k, min_s, max_s)
        self._t.set_status(m, Status.SUSPECT, now)
        if accuser != self.id:  # probe it next: confirm (or clear) the accusation quickly
            self._probe_order.insert(self._probe_pos, node)
        self._enqueue(Suspect(node=node, incarnation=inc, accuser=accuser))

    def _on_dead(self, node: str, inc: int, accuser: str, now: float) -> None:
        if node == self.id:
            if inc >= self.incarnation and not self.leaving:
                self.health = min(self.cfg.awareness_max - 1, self.health + 1)
                self._refute(inc)
            return
        m = self._t.get(node)
        if m is None or inc < m.incarnation or m.status not in LIVE:
            return
        m.incarnation, m.suspicion = inc, None
        self._t.set_status(m, Status.LEFT if accuser == node else Status.DEAD, now)
        self._enqueue(Dead(node=node, incarnation=inc, accuser=accuser))

    def _on_facts(self, node: str, version: int, facts: dict[str, Any]) -> None:
        if node == self.id:  # peers hold a version we no longer remember (we restarted): jump past it
            if version > self.facts_version or (version == self.facts_version and facts != self.own_facts):
                self.facts_version = version
                self.set_facts(self.own_facts)
            return
        known = self._t.facts.get(node)
        if known is not None and known[0] >= version:
            return
        self._t.facts[node] = (version, facts)
        self._enqueue(Facts(node=node, version=version, facts=facts))
        self._events.append(FactsChanged(node, version))

    def _refute(self, inc: int) -> None:
        self.incarnation = max(self.incarnation, inc) + 1
        self._enqueue(self._own_alive())
        self._events.append(Refuted(self.incarnation))

    def _merge(self, src: str, rows: tuple[MemberState, ...], now: float) -> None:
        for row in rows:
            if row.status is Status.ALIVE or (row.status is Status.SUSPECT and self._t.get(row.node) is None):
                self._on_alive(row.node, row.incarnation, row.addr, now)
            if row.status is Status.LEFT:
                self._on_dead(row.node, row.incarnation, row.node, now)
            elif row.status is not Status.ALIVE:  # remote dead is only a suspicion here
                self._on_suspect(row.node, row.incarnation, src, now)
            if row.facts is not None:
                self._on_facts(row.node, row.facts_version, row.facts)

    # ---- helpers -------------------------------------------------------------------------------------

    def _add(self, node: str, addr: str, inc: int, now: float) -> None:
        self._t.add(node, addr, inc, now)
        self._probe_order.insert(self.rng.randint(self._probe_pos, len(self._probe_order)), node)

    def _own_alive(self) -> Alive:
        return Alive(node=self.id, incarnation=self.incarnation, addr=self.addr)

    def _full_state(self) -> tuple[MemberState, ...]:
        own = MemberState(
            node=self.id,
            addr=self.addr,
            incarnation=self.incarnation,
            status=Status.LEFT if self.leaving else Status.ALIVE,
            facts_version=self.facts_version,
            facts=self.own_facts if self.facts_version else None,
        )
        return (own, *self._t.rows())

    def _enqueue(self, update: Any) -> None:
        (self._facts_q if isinstance(update, Facts) else self._state_q).put(update.node, update)

    def _piggyback(self) -> tuple[Any, ...]:
        """Updates for one outgoing message: membership changes first, then facts, within the budget."""
        if not (self._state_q or self._facts_q):
            return ()
        limit = retransmit_limit(self.cfg.retransmit_mult, self._t.n_live)
        budget = self.cfg.max_piggyback_bytes
        out, used = self._state_q.take(budget, limit) if self._state_q else ([], 0)
        if self._facts_q and used < budget:
            out += self._facts_q.take(budget - used, limit, at_least_one=not out)[0]
        return tuple(out)

    def _send(self, to: str, msg: Any) -> None:
        m = self._t.get(to)
        self._out.append(Send(to, msg, m.addr if m else None))

"""Sans-IO node core: every cluster protocol decision of one node, driven by the transport and the simulator.

It owns this node's :class:`MembershipCore`, :class:`ElectionCore` and :class:`PlacementFence`, and adds the
rules that sit between them: founding a new cluster (bootstrap and the wait for join seeds), mDNS candidates
that count only once they prove the cluster secret, and placement delivery with acknowledgements and
re-sends. Like etcd raft's ``RawNode``, nothing here reads a clock, sleeps, does I/O or uses the global
random; the driver passes ``now`` in and acts on a :class:`NodeReady`::

    core = NodeCore(node_id, addr, NodeCoreConfig.lan(), random.Random(seed), now, hard_state=..., placement=...)
    core.join(seed_addrs, now)              # --join seeds (trusted: the operator typed them)
    core.discovered(addr, now)              # an mDNS record of our cluster id (unverified, rate-limited)
    loop:
        core.tick(now)                      # every ~50 ms
        core.step(src, msg, now)            # src = authenticated envelope sender
        core.delivered(out.ack, ok, now)    # for each sent Outbound with an ack: did it get a 2xx answer
        rd = core.ready()
        persist rd.hard_state, then the last of rd.placements   <- BEFORE sending anything
        send rd.messages; act on rd.events (Note texts, PlacementApplied, ...); core.advance()

Bootstrap (a node with a persisted term or voter set never bootstraps, it resumes):

* No join seeds and no live peer within ``bootstrap_grace``: found a new cluster as its single voter
  and elect itself at once. Unverified mDNS candidates do not count: a spoofed record must not keep a
  node from founding.
* Otherwise join as a non-voter; the leader adds live non-voters that ack its beats one at a time.
* Brand-new nodes that know each other and see no established node: each advertises
  ``{"_cluster": {"bootstrapped": bool}}`` in its facts; once every live peer's flag is known and none
  is bootstrapped, the node with the lowest id founds the cluster (after waiting up to ``seed_wait`` for
  every join seed to answer, so that peers that found it first are not taken for the whole story) and
  the others are added by it. Silent seeds are retried for as long as they stay silent (membership), so
  two clusters that formed apart meet once a seed answers and the election's lineage rule merges them.

mDNS candidates (anyone on the LAN can announce a record carrying our cluster id): at most
``max_candidates`` unverified at a time (more are dropped and counted); each gets a full-state push
every ``candidate_interval``, at most ``candidate_attempts`` times. A candidate is verified when a live
member has its address (that member sent us signed messages: it holds the secret); otherwise it is
forgotten, and not re-added for ``candidate_cooldown``.

Placement delivery: :meth:`publish_placement` (leader only) stamps ``(term, version)``, applies it
through the fence, and sends it to every live member. A 2xx answer (:meth:`delivered`) is the member's
acknowledgement; every ``placement_resend`` the leader re-sends it to live members that have not
acknowledged it, and every ``placement_refresh`` to all of them (a member that restarted from scratch
gets it again). Members accept a placement only through the fence.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any

from aivailable.gossip.election import (
    BecameLeader,
    ElectionCore,
    HardState,
    Hup,
    LeaderChanged,
    SteppedDown,
    VotersChanged,
)
from aivailable.gossip.fencing import PlacementFence
from aivailable.gossip.members import LIVE
from aivailable.gossip.membership import MemberChanged, MembershipCore
from aivailable.gossip.membership_types import FactsChanged, Refuted
from aivailable.gossip.messages import ELECTION_TYPES, MEMBERSHIP_TYPES, PlacementPublish, Status, Sync
from aivailable.gossip.node_types import (
    NodeCoreConfig,
    NodeReady,
    Note,
    Outbound,
    PlacementApplied,
    PlacementRefused,
)

__all__ = [
    "CLUSTER_KEY",
    "NodeCore",
    "NodeCoreConfig",
    "NodeReady",
    "Note",
    "Outbound",
    "PlacementApplied",
    "PlacementRefused",
]

CLUSTER_KEY = "_cluster"  # reserved facts key: this core's own bootstrap flag
INFO, WARNING = 20, 30  # logging levels, without importing logging into a sans-IO module


class NodeCore:
    """One node's whole cluster protocol; see the module docstring for the driver contract."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        config: NodeCoreConfig,
        rng: random.Random,
        now: float,
        *,
        hard_state: HardState | None = None,
        placement: tuple[int, int, dict[str, Any]] | None = None,
        voters: tuple[str, ...] = (),
    ):
        """Restore ``hard_state``/``placement`` if persisted; ``voters`` pre-forms a cluster (simulator)."""
        self.id, self.addr, self.cfg = node_id, addr, config.validate()
        self._rng = rng
        self.mem = MembershipCore(node_id, addr, self.cfg.membership, random.Random(rng.random()), now)
        self.elect = ElectionCore(
            node_id, self.cfg.election, random.Random(rng.random()), now, state=hard_state, voters=voters
        )
        self.fence = PlacementFence(highest_term=self.elect.term)
        self.placement = placement
        if placement is not None:
            self.fence.observe_term(placement[0])
            self.fence.term, self.fence.version = placement[0], placement[1]
        self.started_at = now
        self.seeds: list[str] = []
        self.user_facts: dict[str, Any] = {}
        self._flag = self.bootstrapped()
        self.mem.set_facts(self._facts())
        self._seed_wait_noted = False
        self.founded: str | None = None  # why this node founded its cluster, once it did
        # placement delivery (leader)
        self.published: PlacementPublish | None = None
        self.acked: dict[str, tuple[int, int]] = {}
        self._pl_inflight: set[str] = set()
        self._next_resend = self._next_refresh = 0.0
        # mDNS candidates: address -> [attempts made, next attempt at]
        self.candidates: dict[str, list[float]] = {}
        self._forgotten: dict[str, float] = {}  # address -> until when it is ignored
        self.candidates_dropped = 0
        # the Ready being gathered
        self._hs: HardState | None = None
        self._placements: list[tuple[int, int, dict[str, Any]]] = []
        self._out: list[Outbound] = []
        self._events: list[Any] = []
        self._changed = False
        self._collect(now)

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        return self.elect.leader

    @property
    def term(self) -> int:
        return self.elect.term

    @property
    def is_leader(self) -> bool:
        return self.elect.is_leader

    def bootstrapped(self) -> bool:
        return self.elect.term > 0 or bool(self.elect.config.voters)

    # ---- driver API ----------------------------------------------------------------------------------

    def ready(self) -> NodeReady:
        return NodeReady(self._hs, tuple(self._placements), tuple(self._out), tuple(self._events), self._changed)

    def has_ready(self) -> bool:
        return bool(self._hs or self._placements or self._out or self._events or self._changed)

    def advance(self) -> None:
        """Call after the Ready was persisted and sent."""
        self._hs, self._changed = None, False
        self._placements.clear()
        self._out.clear()
        self._events.clear()

    def start(self, now: float) -> None:
        """The driver starts running: the bootstrap timers count from here."""
        self.started_at = now
        self._note(f"started (term {self.term}, voters {', '.join(self.elect.config.voters) or 'none'})")
        if self.seeds:
            self.mem.join(list(self.seeds))
        self._collect(now)

    def join(self, addrs: list[str], now: float) -> None:
        """Add join seeds (the operator's ``--join``): trusted, retried while silent, and waited for before
        founding. Known ones and this node's own address are ignored."""
        new = [a for a in addrs if a != self.addr and a not in self.seeds]
        if not new:
            return
        self.seeds.extend(new)
        for a in new:
            self.candidates.pop(a, None)
        self.mem.join(list(self.seeds))
        self._collect(now)

    def discovered(self, addr: str, now: float) -> bool:
        """An mDNS record of our cluster id names ``addr``. It is pushed to a few times and counts only once
        a live member has that address; returns False when it was ignored (known, cooling down, too many)."""
        if addr == self.addr or addr in self.seeds or addr in self.candidates or addr in self._live_addrs():
            return False
        if self._forgotten.get(addr, -1.0) > now:
            return False
        if len(self.candidates) >= self.cfg.max_candidates:
            self.candidates_dropped += 1
            return False
        self.candidates[addr] = [0, now]
        self._push_candidates(now)
        self._collect(now)
        return True

    def set_facts(self, facts: dict[str, Any], now: float) -> None:
        """This node's facts (key ``_cluster`` is reserved), disseminated by membership."""
        self.user_facts = dict(facts)
        self.mem.set_facts(self._facts())
        self._collect(now)

    def leave(self, now: float) -> None:
        """Announce a graceful leave (keep ticking a few gossip intervals so it spreads)."""
        self.mem.leave()
        self._collect(now)

    def tick(self, now: float) -> None:
        self.mem.tick(now)
        self.elect.tick(now)
        self._collect(now)
        self._maybe_bootstrap(now)
        self._push_candidates(now)
        self._resend_placement(now)
        self._collect(now)

    def step(self, src: str, msg: Any, now: float) -> None:
        """Handle one message from authenticated sender ``src``."""
        if isinstance(msg, MEMBERSHIP_TYPES):
            self.mem.step(src, msg, now)
        elif isinstance(msg, ELECTION_TYPES):
            self.elect.step(src, msg, now)
        elif isinstance(msg, PlacementPublish):
            self.fence.observe_term(self.elect.term)
            if self.fence.accept(msg.term, msg.version):
                self._apply(src, msg)
            else:
                self._events.append(
                    PlacementRefused(src, msg.term, msg.version, stale=msg.term < self.fence.highest_term)
                )
        else:
            raise TypeError(f"node core cannot step {type(msg).__name__}")
        self._collect(now)

    def delivered(self, ack: Hashable, ok: bool, now: float) -> None:
        """The outcome of an :class:`Outbound` that carried ``ack``: ``ok`` when it got a 2xx answer."""
        match ack:
            case ("addr", str(addr)):
                if ok:
                    self.mem.seed_answered(addr, now)
            case ("placement", str(node), int(term), int(version)):
                self._pl_inflight.discard(node)
                if ok:
                    self.acked[node] = (term, version)
        self._collect(now)

    def publish_placement(self, assignments: dict[str, Any], now: float) -> tuple[int, int] | None:
        """Leader only: stamp, apply locally, deliver to every live member until acknowledged. Returns
        ``(term, version)``, or None when this node is not the leader (or was deposed meanwhile)."""
        if not self.elect.is_leader:
            return None
        term = self.elect.term
        self.fence.observe_term(term)
        last = self.published.version if self.published is not None else 0
        version = max(self.fence.version, last) + 1
        if not self.fence.accept(term, version):  # a newer term was seen: we are deposed
            return None
        msg = PlacementPublish(term=term, version=version, assignments=assignments)
        self._apply(self.id, msg)
        self.published, self.acked = msg, {}
        self._next_resend = now
        self._resend_placement(now)
        self._collect(now)
        return term, version

    # ---- gathering the Ready -------------------------------------------------------------------------

    def _collect(self, now: float) -> None:
        """Take every inner core's Ready (handling its events, which may make more), until none has any."""
        while True:
            busy = False
            for core in (self.mem, self.elect):
                while core.has_ready():
                    busy = True
                    rd = core.ready()
                    core.advance()
                    if rd.persist is not None:
                        self._hs = rd.persist
                    for send in rd.messages:
                        self._send(send.to, send.msg, send.addr)
                    for ev in rd.events:
                        self._on_event(ev, now)
            self.fence.observe_term(self.elect.term)
            if self.bootstrapped() != self._flag:
                self._flag = not self._flag
                self.mem.set_facts(self._facts())
                continue
            if not busy:
                return

    def _on_event(self, ev: Any, now: float) -> None:
        self._events.append(ev)
        match ev:
            case MemberChanged():
                self._changed = True
                if ev.new is not None:
                    self.elect.observe_member(ev.node, ev.new in LIVE, now, left=ev.new is Status.LEFT)
                    if ev.new in LIVE and ev.old not in LIVE:
                        self.acked.pop(ev.node, None)  # (re)joined: deliver the placement again
                        m = self.mem.member(ev.node)
                        if m is not None and self.candidates.pop(m.addr, None) is not None:
                            self._note(f"mDNS peer at {m.addr} verified: it is {ev.node}")
                old = ev.old.value if ev.old else "new"
                self._note(f"member {ev.node}: {old} -> {ev.new.value if ev.new else 'forgotten'}")
            case FactsChanged():
                self._changed = True
            case Refuted():
                self._note(f"refuted a suspicion of this node (incarnation {ev.incarnation})")
            case LeaderChanged():
                self._changed = True
                self._note(f"leader: {ev.leader or 'unknown'} (term {ev.term})")
            case BecameLeader():
                self._changed = True
                self.published = None
                how = " by takeover" if ev.takeover else ""
                self._note(f"this node leads term {ev.term}{how}; voters {', '.join(ev.config.voters)}")
            case SteppedDown():
                self._changed = True
                self.published = None
                self._note(f"stepped down in term {ev.term}: {ev.reason}")
            case VotersChanged():
                self._changed = True
                self._note(f"voters: {', '.join(ev.config.voters)}")

    def _send(self, to: str, msg: Any, addr: str | None = None, ack: Hashable | None = None) -> None:
        if to == self.id:
            return
        if addr is not None:  # membership knows the address (a member, or a join seed): note answers
            self._out.append(Outbound(addr, msg, to, ack if ack is not None else ("addr", addr)))
            return
        m = self.mem.member(to)
        self._out.append(Outbound(m.addr if m is not None else None, msg, to, ack))

    def _note(self, text: str, log_level: int | None = None, log: str | None = None) -> None:
        self._events.append(Note(text, log_level, log))

    def _facts(self) -> dict[str, Any]:
        return {**self.user_facts, CLUSTER_KEY: {"bootstrapped": self.bootstrapped()}}

    def _live_addrs(self) -> set[str]:
        out = set()
        for node in self.mem.live_members():
            m = self.mem.member(node)
            if m is not None:
                out.add(m.addr)
        return out

    # ---- bootstrap -----------------------------------------------------------------------------------

    def _maybe_bootstrap(self, now: float) -> None:
        """The bootstrap rule of the module docstring."""
        if self.bootstrapped() or now - self.started_at < self.cfg.bootstrap_grace:
            return
        peers = [n for n in self.mem.live_members() if n != self.id]
        if not peers:
            if self.seeds:
                return  # told to join: never found a cluster alone
            why = "no join seeds and no peers found"
        else:
            for node in peers:
                facts = (self.mem.facts(node) or (0, {}))[1].get(CLUSTER_KEY)
                if not isinstance(facts, dict) or facts.get("bootstrapped") is not False:
                    return  # unknown yet, or an established cluster: its leader will add us
            if min(peers) < self.id:
                return
            # A seed counts as heard once a live member has its address, or bootstrap_grace after its 2xx
            # answer (its reply, with its cluster, is on the way; a seed given by host name never matches).
            silent = self.mem.unreached_seeds(now, settle=self.cfg.bootstrap_grace)
            if silent and self._wait_for_seeds(silent, now):
                return
            why = f"lowest id of {len(peers) + 1} new nodes"
            if silent:
                why += f"; join seed(s) {', '.join(silent)} never answered"
        self.elect = ElectionCore(
            self.id, self.cfg.election, random.Random(self._rng.random()), now, voters=(self.id,)
        )
        for node in self.mem.known_members():
            m = self.mem.member(node)
            if m is not None:
                self.elect.observe_member(node, m.status in LIVE, now, left=m.status is Status.LEFT)
        self.founded = why
        self._note(
            f"bootstrapped a new cluster as its only voter ({why})",
            INFO,
            f"cluster: {self.id} bootstrapped a new cluster as its only voter ({why})",
        )
        self.elect.step(self.id, Hup(), now)  # campaign now rather than after an election timeout
        self._collect(now)

    def _wait_for_seeds(self, silent: list[str], now: float) -> bool:
        """Founding by the lowest-id rule waits for the ``silent`` join seeds, up to ``seed_wait``."""
        seeds = ", ".join(silent)
        if now - self.started_at < self.cfg.seed_wait:
            if not self._seed_wait_noted:
                self._seed_wait_noted = True
                self._note(
                    f"waiting up to {self.cfg.seed_wait:g} s for join seed(s) {seeds} to answer before "
                    "founding a cluster",
                    INFO,
                    f"cluster: {self.id} and its new peers could found a cluster, but join seed(s) {seeds} "
                    f"have not answered yet; waiting up to {self.cfg.seed_wait:g} s for them, so that two "
                    "clusters do not form",
                )
            return True
        self._note(
            f"join seed(s) {seeds} did not answer within {self.cfg.seed_wait:g} s",
            WARNING,
            f"cluster: join seed(s) {seeds} did not answer within {self.cfg.seed_wait:g} s; founding without "
            "them. If a cluster runs there, the two merge once they reach each other (check --join and that "
            "those nodes are up)",
        )
        return False

    # ---- mDNS candidates -----------------------------------------------------------------------------

    def _push_candidates(self, now: float) -> None:
        if not self.candidates:
            return
        live = self._live_addrs()
        for addr in list(self.candidates):
            attempts, due = self.candidates[addr]
            if addr in live:
                del self.candidates[addr]
                continue
            if now < due:
                continue
            if attempts >= self.cfg.candidate_attempts:
                del self.candidates[addr]
                self._forgotten = {a: t for a, t in self._forgotten.items() if t > now}
                if len(self._forgotten) < 4 * self.cfg.max_candidates:
                    self._forgotten[addr] = now + self.cfg.candidate_cooldown
                self._note(
                    f"mDNS peer at {addr} forgotten: no member of this cluster answered from there",
                    WARNING,
                    f"mDNS: forgot the peer announced at {addr}: {int(attempts)} pushes brought no signed "
                    "answer from that address (a stale or spoofed record, or another cluster with our id); "
                    f"ignored for {self.cfg.candidate_cooldown:g} s",
                )
                continue
            self.candidates[addr] = [attempts + 1, now + self.cfg.candidate_interval]
            self._out.append(Outbound(addr, Sync(members=self.mem.full_state()), "", ("candidate", addr)))

    # ---- placement delivery --------------------------------------------------------------------------

    def _apply(self, src: str, msg: PlacementPublish) -> None:
        self.placement = (msg.term, msg.version, msg.assignments)
        self._placements.append(self.placement)
        self._events.append(PlacementApplied(src, msg.term, msg.version, msg.assignments, self.elect.term))

    def _resend_placement(self, now: float) -> None:
        p = self.published
        if p is None:
            return
        if not self.elect.is_leader or self.elect.term != p.term:
            self.published = None
            return
        if now >= self._next_refresh:
            self._next_refresh = now + self.cfg.placement_refresh
            self.acked.clear()
        if now < self._next_resend:
            return
        self._next_resend = now + self.cfg.placement_resend
        want = (p.term, p.version)
        for node in self.mem.live_members():
            if node == self.id or self.acked.get(node) == want or node in self._pl_inflight:
                continue
            m = self.mem.member(node)
            if m is None:
                continue
            self._pl_inflight.add(node)
            self._out.append(Outbound(m.addr, p, node, ("placement", node, p.term, p.version)))

"""Invariants and figures for :mod:`aivailable.gossip.sim` runs.

Safety (checked as events happen):
* **election safety**: at most one leader per term. The documented exceptions are two lineages with
  disjoint voter sets: the small-cluster takeover after a true partition, and two clusters founded apart
  (they merge once they meet); such terms are counted as ``split_brain_terms``, never as a pass for
  overlapping voter sets.
* **minority elects nobody**: a leader elected by votes while the network was stable since its campaign
  began has a majority of its voter set on its side of the partition.
* **one vote per term**: the persisted (term, vote) of a node never changes vote within a term and its
  term never goes back, across restarts.
* **fencing**: a placement is applied only if its term >= the node's current and highest persisted term,
  with strictly increasing ``(term, version)``, and only from the node that was leader of that term.

* **one founder** (cluster start-up, the e3a5284 split): when every new node joins one root node (and
  maybe others), the root starts less than ``seed_wait`` minus a margin after them, and no fault comes
  before everyone started, exactly one node founds a cluster.
* **acks are true**: a leader counts a member as having its placement only if that member's fence holds
  that placement or a newer one.

Liveness (checked once stable, after the final heal and restarts):
* membership converges: every up node's live set equals the set of up nodes (time measured);
* facts converge: every up node holds every other up node's latest facts version;
* one leader with the highest term, known to all up nodes;
* every demanded model placed, on an up node, by the same accepted placement everywhere, and that is the
  leader's latest publication (delivery);
* every up node is a voter of the leader's voter set (clusters that formed apart have merged).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from aivailable.gossip.messages import Status

if TYPE_CHECKING:
    from aivailable.gossip.election import BecameLeader, HardState
    from aivailable.gossip.membership import MemberChanged
    from aivailable.gossip.messages import PlacementPublish
    from aivailable.gossip.sim import Network, Sim


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class _Crash:
    __slots__ = ("at", "first", "all", "waiting", "valid")

    def __init__(self, at: float, waiting: set[str], valid: bool):
        self.at, self.waiting, self.valid = at, waiting, valid
        self.first: float | None = None
        self.all: float | None = None


class Checker:
    def __init__(self, n: int):
        self.n = n
        self.violations: list[str] = []
        self.leaders: dict[int, list[tuple[str, tuple[str, ...], bool]]] = {}
        self.takeovers = 0
        self.votes: dict[tuple[str, int], str | None] = {}
        self.max_term: dict[str, int] = {}
        self.last_applied: dict[str, tuple[int, int]] = {}
        self.crashes: dict[str, _Crash] = {}
        self.done: list[_Crash] = []
        self.final_heal_at: float | None = None
        self.converged_at: float | None = None
        self.split_brain_terms = 0
        self.false_deads = 0  # a live node declared dead by a peer on its side, 10 s after any change
        self.double_leader_terms = 0  # terms with two leaders (not the documented disjoint takeover)
        self.stale_applied = 0  # placements applied from a stale term or not newer than the last one
        self.placements_applied = 0
        self.extra_settle_s = 0.0  # time past the settle phase until one leader again (see Sim.run)
        self.placements_refused = 0  # refused by a node's fence as a repeat of one already applied
        self.stale_refused = 0  # refused by a node's fence: from a term older than one it has seen
        self.founders: list[tuple[str, float]] = []  # (node, when) for every cluster founded
        self.one_founder_expected = False  # set by bootstrap_scenario: the rooted start-up case
        self.bootstrap_kind: str | None = None
        self.false_acks = 0

    # ---- cluster start-up ----------------------------------------------------------------------------

    # A rooted start-up is expected to have one founder when the root starts this much before the other
    # nodes' seed_wait runs out: two retry rounds of a silent seed (2 x reconnect_interval) plus the
    # settle time after its answer (bootstrap_grace), with room for a lost message or two.
    ROOT_MARGIN_S = 10.0

    def bootstrap_scenario(self, kind: str, start: dict[str, float], seeds: dict[str, list[str]],
                           seed_wait: float) -> None:
        self.bootstrap_kind = kind
        roots = [n for n, s in seeds.items() if not s]
        if kind == "rooted" and len(roots) == 1 and all(roots[0] in s for n, s in seeds.items() if s):
            others = [t for n, t in start.items() if n != roots[0]]
            self.one_founder_expected = start[roots[0]] < min(others) + seed_wait - self.ROOT_MARGIN_S

    def founded(self, node: str, now: float) -> None:
        self.founders.append((node, now))

    def check_acks(self, sim: Sim) -> None:
        """Safety of placement delivery: an ack the leader counts is a placement the member holds."""
        for n in sim.nodes.values():
            if not n.up or not n.core.is_leader:
                continue
            for member, pair in n.core.acked.items():
                peer = sim.nodes.get(member)
                if peer is not None and peer.up and (peer.fence.term, peer.fence.version) < pair:
                    self.false_acks += 1
                    self.fail(sim.now, f"{n.id} counts {member} as holding placement {pair}, but it holds "
                                       f"{(peer.fence.term, peer.fence.version)}")
                    return

    def fail(self, now: float, what: str) -> None:
        self.violations.append(f"t={now:.3f} {what}")

    # ---- safety, as events happen --------------------------------------------------------------------

    def persisted(self, node: str, hs: HardState) -> None:
        if hs.term < self.max_term.get(node, 0):
            self.fail(-1, f"{node} persisted term {hs.term} < earlier {self.max_term[node]}")
        self.max_term[node] = max(self.max_term.get(node, 0), hs.term)
        key = (node, hs.term)
        before = self.votes.get(key)
        if before is not None and hs.voted_for != before:
            self.fail(-1, f"{node} changed its vote in term {hs.term}: {before} -> {hs.voted_for}")
        if hs.voted_for is not None:
            self.votes[key] = hs.voted_for

    def became_leader(self, node: str, ev: BecameLeader, now: float, net: Network) -> None:
        self.leaders.setdefault(ev.term, []).append((node, ev.config.voters, ev.takeover))
        self.takeovers += ev.takeover
        if ev.takeover or net.changed_at >= ev.campaign_started:
            return
        side = net.group.get(node, 0)
        mine = sum(1 for v in ev.config.voters if net.group.get(v, 0) == side)
        if mine < ev.config.majority():
            self.fail(
                now,
                f"{node} elected in term {ev.term} with {mine}/{len(ev.config.voters)} voters on its side",
            )

    def applied(self, node: str, src: str, msg: PlacementPublish, node_term: int, now: float) -> None:
        pair = (msg.term, msg.version)
        self.placements_applied += 1
        stale = False
        if msg.term < node_term or msg.term < self.max_term.get(node, 0):
            stale = True
            self.fail(now, f"{node} applied placement of stale term {msg.term} (it has seen {node_term})")
        if pair <= self.last_applied.get(node, (0, 0)):
            stale = True
            self.fail(now, f"{node} applied placement {pair} not newer than {self.last_applied[node]}")
        self.stale_applied += stale
        self.last_applied[node] = pair
        if src not in {name for name, _, _ in self.leaders.get(msg.term, [])}:
            self.fail(now, f"{node} applied placement {pair} from {src}, not a leader of term {msg.term}")

    # ---- failure detection timing --------------------------------------------------------------------

    def net_changed(self, now: float, partitioned: bool) -> None:
        if partitioned:
            for c in self.crashes.values():
                c.valid = c.valid and c.all is not None

    def crashed(self, node: str, now: float, partitioned: bool, up: list[str]) -> None:
        """Detection is timed only for crashes that no partition overlaps."""
        self.crashes[node] = _Crash(now, set(up), valid=not partitioned)

    def restarted(self, node: str) -> None:
        c = self.crashes.pop(node, None)
        if c is not None and c.valid and c.first is not None:
            self.done.append(c)
        for other in self.crashes.values():
            other.waiting.discard(node)

    def member_changed(self, observer: str, ev: MemberChanged, now: float, sim: Sim | None = None) -> None:
        if sim is not None and ev.new is Status.DEAD and ev.node not in self.crashes:
            node = sim.nodes.get(ev.node)
            steady = now - max(sim.net.changed_at, node.started_at if node else 0.0) > 10.0
            self.false_deads += (
                node is not None and node.up and steady and sim.net.connected(observer, ev.node)
            )
        c = self.crashes.get(ev.node)
        if c is None or ev.new not in (Status.DEAD, Status.LEFT):
            return
        if c.first is None:
            c.first = now - c.at
        c.waiting.discard(observer)
        if not c.waiting and c.all is None:
            c.all = now - c.at

    # ---- liveness, once stable -----------------------------------------------------------------------

    def sample(self, sim: Sim) -> None:
        if not self.false_acks:
            self.check_acks(sim)
        if self.final_heal_at is None or self.converged_at is not None:
            return
        if self._membership_agrees(sim):
            self.converged_at = sim.now - self.final_heal_at

    @staticmethod
    def _membership_agrees(sim: Sim) -> bool:
        up = sorted(n.id for n in sim.nodes.values() if n.up)
        return all(sim.nodes[n].mem.live_members() == up for n in up)

    def finish(self, sim: Sim) -> None:
        now = sim.now
        for term, entries in sorted(self.leaders.items()):
            if len({name for name, _, _ in entries}) < 2:
                continue
            sets = [set(v) for _, v, _ in entries]
            disjoint = all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])
            if disjoint and (self.takeovers or len(self.founders) > 1):  # separate lineages, merged later
                self.split_brain_terms += 1
            else:
                self.double_leader_terms += 1
                self.fail(now, f"two leaders in term {term}: {[name for name, _, _ in entries]}")
        for c in self.crashes.values():
            if c.valid and c.first is not None:
                self.done.append(c)
        up = [n for n in sim.nodes.values() if n.up]
        if self.converged_at is None or not self._membership_agrees(sim):
            views = {n.id: n.mem.live_members() for n in up}
            self.fail(now, f"membership did not converge within {sim.cfg.settle:.0f} s: {views}")
        for a in up:
            for b in up:
                known = a.mem.facts(b.id)
                if known is None or known[0] != b.mem.facts_version:
                    self.fail(
                        now, f"{a.id} holds facts v{known and known[0]} of {b.id}, not v{b.mem.facts_version}"
                    )
                    break
        problem = self.leadership_problem(sim)
        if problem is not None:
            self.fail(now, problem)
        if self.one_founder_expected and len({n for n, _ in self.founders}) != 1:
            self.fail(now, f"rooted start-up founded {len(self.founders)} clusters, expected 1: {self.founders}")

    def settled(self, sim: Sim) -> bool:
        """Membership, facts, leader and placement all agree among the up nodes right now."""
        up = [n for n in sim.nodes.values() if n.up]
        facts = all((a.mem.facts(b.id) or (None,))[0] == b.mem.facts_version for a in up for b in up)
        return self._membership_agrees(sim) and facts and self.leadership_problem(sim) is None

    @staticmethod
    def leadership_problem(sim: Sim) -> str | None:
        """Why the up nodes do not (yet) agree on one leader and one placement; None when they do."""
        if not sim.cfg.election:
            return None
        up = [n for n in sim.nodes.values() if n.up]
        leaders = [n for n in up if n.elect is not None and n.elect.is_leader]
        top = max(n.elect.term for n in up if n.elect is not None)
        if len(leaders) != 1 or leaders[0].elect.term != top:
            return f"no single leader of the top term {top} once stable: {[n.id for n in leaders]}"
        lead = leaders[0].id
        if any(n.elect.leader != lead for n in up if n.elect is not None):
            return f"not every node follows {lead}: {[(n.id, n.elect.leader) for n in up if n.elect]}"
        placements = {(n.fence.term, n.fence.version) for n in up}
        if len(placements) != 1:
            return f"nodes applied different placements once stable: {sorted(placements)}"
        latest = leaders[0].core.published
        if latest is not None and placements != {(latest.term, latest.version)}:
            return f"the leader's latest placement {(latest.term, latest.version)} not delivered: {placements}"
        voters = set(leaders[0].elect.config.voters)
        if not voters >= {n.id for n in up}:
            return f"up nodes that are not voters of {lead}'s voter set {sorted(voters)} once stable"
        ids = {n.id for n in up}
        for n in up:
            missing = [m for m in sim.cfg.demand if n.applied.get(m, {}).get("node") not in ids]
            if missing:
                return f"{n.id}: demanded models not placed on a live node: {missing}"
        return None

    def report(self, sim: Sim) -> dict[str, Any]:
        horizon = max(sim.now, 1e-9)
        return {
            "seed": sim.seed,
            "violations": self.violations,
            "converge_s": self.converged_at,
            "detect_first": [c.first for c in self.done if c.first is not None],
            "detect_all": [c.all for c in self.done if c.all is not None],
            "leaders": sum(len(v) for v in self.leaders.values()),
            "takeovers": self.takeovers,
            "split_brain_terms": self.split_brain_terms,
            "double_leader_terms": self.double_leader_terms,
            "stale_applied": self.stale_applied,
            "placements_applied": self.placements_applied,
            "placements_refused": self.placements_refused,
            "stale_refused": self.stale_refused,
            "extra_settle_s": self.extra_settle_s,
            "false_deads": self.false_deads,
            "msgs_per_node_s": sim.sent / sim.cfg.nodes / horizon,
            "rejected": dict(sim.rejected),
            "bootstrap": self.bootstrap_kind,
            "founders": len(self.founders),
            "one_founder_expected": self.one_founder_expected,
        }

"""The member table behind :class:`~aivailable.gossip.membership.MembershipCore` (sans-IO).

Pure bookkeeping with the indexes the protocol needs to stay O(1) per message at 1,000 nodes: members
by id, a swap-remove list for random picks, the suspects (timers to check) and the dead (to reap),
the live count (for the ``n`` in the suspicion and retransmit formulas), and each member's facts.
Every status change goes through :meth:`MemberTable.set_status` (which applies
:meth:`Status.transition`) and is reported as a :class:`MemberChanged` event.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from aivailable.gossip.messages import MemberState, Status
from aivailable.gossip.suspicion import Suspicion

LIVE = (Status.ALIVE, Status.SUSPECT)


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """Event: ``node`` went from ``old`` to ``new`` (None: unknown before / forgotten now)."""

    node: str
    old: Status | None
    new: Status | None
    incarnation: int


@dataclass(slots=True)
class Member:
    node: str
    addr: str
    incarnation: int
    status: Status
    since: float  # when ``status`` was entered
    suspicion: Suspicion | None = None


class MemberTable:
    def __init__(self, rng: random.Random, events: list[Any]):
        self.rng = rng
        self.events = events  # shared with the core: MemberChanged goes out with its Ready
        self.members: dict[str, Member] = {}
        self.suspects: dict[str, Member] = {}
        self.dead: dict[str, Member] = {}  # dead and left, until reaped
        self.facts: dict[str, tuple[int, dict[str, Any]]] = {}
        self.n_live = 1  # alive + suspect, this node included
        self._ids: list[str] = []  # every member, for O(1) random picks
        self._pos: dict[str, int] = {}

    def get(self, node: str) -> Member | None:
        return self.members.get(node)

    def add(self, node: str, addr: str, inc: int, now: float) -> Member:
        m = self.members[node] = Member(node, addr, inc, Status.ALIVE, now)
        self._pos[node] = len(self._ids)
        self._ids.append(node)
        self.n_live += 1
        self.events.append(MemberChanged(node, None, Status.ALIVE, inc))
        return m

    def set_status(self, m: Member, new: Status, now: float) -> None:
        old = m.status
        m.status = old.transition(new)
        m.since = now
        self.n_live += (new in LIVE) - (old in LIVE)
        self.suspects.pop(m.node, None)
        self.dead.pop(m.node, None)
        if new is Status.SUSPECT:
            self.suspects[m.node] = m
        elif new in (Status.DEAD, Status.LEFT):
            self.dead[m.node] = m
        self.events.append(MemberChanged(m.node, old, new, m.incarnation))

    def remove(self, node: str) -> None:
        m = self.members.pop(node)
        self.dead.pop(node, None)
        self.suspects.pop(node, None)
        self.facts.pop(node, None)
        self.n_live -= m.status in LIVE
        pos = self._pos.pop(node)
        last = self._ids.pop()
        if last != node:
            self._ids[pos] = last
            self._pos[last] = pos
        self.events.append(MemberChanged(node, m.status, None, m.incarnation))

    def random_ids(self, k: int, now: float, dead_for: float = 0.0) -> list[str]:
        """Up to ``k`` distinct random live members, plus dead ones that died less than ``dead_for``
        seconds ago. Expected O(k): random probes into the id list, not a scan."""
        ids, chosen = self._ids, []
        for _ in range(3 * k + 3 if ids else 0):
            node = ids[self.rng.randrange(len(ids))]
            m = self.members[node]
            ok = m.status in LIVE or (m.status is Status.DEAD and now - m.since < dead_for)
            if ok and node not in chosen:
                chosen.append(node)
                if len(chosen) == k:
                    break
        return chosen

    def rows(self) -> list[MemberState]:
        """Every member as a :class:`MemberState` row, facts included (for a full-state sync)."""
        rows = []
        for m in self.members.values():
            version, facts = self.facts.get(m.node, (0, None))
            rows.append(
                MemberState(
                    node=m.node,
                    addr=m.addr,
                    incarnation=m.incarnation,
                    status=m.status,
                    facts_version=version,
                    facts=facts,
                )
            )
        return rows

"""Sans-IO Raft-lite leader election with pre-vote, leader leases and a leader-managed voter set.

Driver contract (no I/O, no clock, no global random in here)::

    core = ElectionCore(node_id, ElectionConfig.lan(), random.Random(seed), now, state=load_hard_state())
    loop:
        core.tick(now)                          # every ~50 ms
        core.step(src, msg, now)                # src = authenticated envelope sender
        core.observe_member(node, alive, now)   # from membership events (suspect counts as alive)
        rd = core.ready()
        if rd.persist: write rd.persist (a HardState) durably, fsync  <- BEFORE sending anything
        send rd.messages; handle rd.events; core.advance()

Persisting first is what makes "one vote per term" survive a crash: a vote or a term must never reach
another node before it is on disk, or a restarted node could vote twice in one term.

Rules (etcd-io/raft, without a replicated log: placement is derived state, only the voter set is
"replicated", and its id ``(term, index)`` plays the role of Raft's last log entry):

* ``step`` checks the term first. A higher term makes us a follower of it, except (a) pre-votes, which
  never change anyone's term, and (b) real vote requests while we are *in lease* (we heard a live leader
  less than ``lease`` ago, or we are the leader): those are refused ("leader stickiness").
* Elections start with a pre-vote round at ``term + 1``; only a majority of pre-votes lets a node bump
  its term. A partitioned minority therefore neither elects anyone nor inflates terms.
* Votes are counted against the candidate's *voter set*, never against who happens to be reachable.
  A vote is granted once per term, and only to a candidate whose voter set id is not older than ours.
* The leader beats every ``heartbeat_interval`` to voters and known live members; acks echo the beat's
  ``sent_at``. If fewer than a majority of voters acked a beat sent within the last ``lease`` seconds,
  it steps down. Since voters refuse votes for ``lease`` after hearing it, a new leader can only be
  elected after the old one has stopped acting (with equal clock rates).
* Only an established leader (a majority acked a beat of its term) changes the voter set, one node at a
  time, and only once the previous change is acked by a majority: a live non-voter that acks our beats
  is added; a voter seen dead for ``removal_timeout`` is removed. Every node persists the voter set it
  last accepted, and a follower takes its leader's voter set as is.

Small clusters (``small_cluster_takeover``): with one voter, that node elects itself (and after a
restart leads the term it already voted for itself in again, without a new term). With two voters a
survivor can never win a majority, so a node that has seen the other voter dead for ``removal_timeout``
takes over alone: it jumps to the next term ``t`` with ``t % 2 == its rank`` in the old voter set (so
the two sides of a true partition can never pick the same term), votes for itself, and becomes leader
of the voter set ``{itself}``. It takes over only with a two-voter set it knows the other voter holds
(``HardState.config_shared``): a leader that shrank the set while the other voter was cut off must not,
since that voter may still be electing leaders under the older, larger set. After a real partition this means two coordinators for a while; placement
is idempotent and fenced by term, so it costs redundant model loads, never lost requests. On healing the
higher term wins, and its leader adds the other node back as a voter. Three or more voters never take
over: a minority side keeps serving what it has and re-places nothing (a larger cluster that removals
shrank to two voters behaves like a two-node one). Should two such lineages ever meet in one term, the
leader with the lower node id wins and the other follows it.

Feed every term this core reaches to :class:`~aivailable.gossip.fencing.PlacementFence` (``observe_term``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace
from typing import Any

from aivailable.errors import ConfigError
from aivailable.gossip.messages import (
    Heartbeat,
    HeartbeatAck,
    Ready,
    Send,
    VoteRequest,
    VoteResponse,
    VoterSet,
)

NEVER = float("-inf")


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    """Timers in seconds. Field defaults are the LAN profile; :meth:`local` is a delta from it."""

    heartbeat_interval: float = 0.25  # leader beat period; also how fast a voter-set change spreads
    election_timeout: float = 1.5  # follower waits uniform [t, 2t) without a beat before a pre-vote
    lease: float = 1.0  # leader steps down without majority acks within it; voters stay sticky for it
    removal_timeout: float = 10.0  # a voter dead this long is removed by the leader (bench/voter_removal.py)
    small_cluster_takeover: bool = True  # 2 voters: survivor takes over after removal_timeout (see top)

    @classmethod
    def lan(cls) -> ElectionConfig:
        return cls()

    @classmethod
    def local(cls) -> ElectionConfig:
        """All nodes on one host: ~5x faster timers."""
        return replace(
            cls.lan(), heartbeat_interval=0.05, election_timeout=0.3, lease=0.2, removal_timeout=5.0
        )

    def validate(self) -> ElectionConfig:
        """Raise :class:`ConfigError` naming the first bad field; return self for chaining."""
        if self.heartbeat_interval <= 0:
            raise ConfigError("heartbeat_interval must be > 0 seconds", param="heartbeat_interval")
        if self.lease < 2 * self.heartbeat_interval:
            raise ConfigError("lease must be >= 2 * heartbeat_interval", param="lease")
        if self.election_timeout < self.lease:
            raise ConfigError("election_timeout must be >= lease", param="election_timeout")
        if self.removal_timeout < self.election_timeout:
            raise ConfigError("removal_timeout must be >= election_timeout", param="removal_timeout")
        return self


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any message of the same Ready is sent."""

    term: int
    voted_for: str | None
    config: VoterSet
    config_shared: bool = True
    """The other voters of ``config`` are known to hold it: it is the bootstrap set, it came from its
    leader, or (for the leader that decided it) every other voter acked it. A two-voter takeover needs
    this, or the other side could still be electing leaders under the older, larger voter set."""


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """Event: in ``term`` the leader is now ``leader`` (None: unknown)."""

    term: int
    leader: str | None


@dataclass(frozen=True, slots=True)
class BecameLeader:
    """Event: this node leads ``term`` with ``config``; ``campaign_started``: when its winning campaign
    (or takeover) began."""

    term: int
    config: VoterSet
    takeover: bool = False
    campaign_started: float = 0.0


@dataclass(frozen=True, slots=True)
class SteppedDown:
    term: int
    reason: str


@dataclass(frozen=True, slots=True)
class VotersChanged:
    config: VoterSet


@dataclass(frozen=True, slots=True)
class Hup:
    """Local message: the election timer fired (never on the wire)."""


class IllegalTransition(RuntimeError):
    """A role change the protocol never makes (a bug, not a remote fault)."""


class ElectionCore:
    """One node's election state machine. See the module docstring for the driver contract."""

    def __init__(
        self,
        node_id: str,
        config: ElectionConfig,
        rng: random.Random,
        now: float,
        state: HardState | None = None,
        voters: tuple[str, ...] = (),
    ):
        """Restore ``state`` if given (a restart), else bootstrap with ``voters`` (empty: a non-voter that
        waits for a leader to add it)."""
        self.id = node_id
        self.cfg = config.validate()
        self.rng = rng
        if state is None:
            state = HardState(0, None, VoterSet(voters=tuple(sorted(set(voters)))))
            self._dirty = bool(voters)
        else:
            self._dirty = False
        self.term, self.voted_for, self.config = state.term, state.voted_for, state.config
        self.config_shared = state.config_shared
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.heard_at = NEVER
        self._step_role = self._step_follower
        self._deadline = 0.0
        self._reset_timer(now)
        self._votes: dict[str, bool] = {}
        self._campaign_at = NEVER
        self._became_at = NEVER
        self._next_beat = NEVER
        self._acks: dict[str, float] = {}
        self._config_acks: set[str] = set()
        self.established = False
        self._alive: dict[str, None] = {}
        self._dead_since: dict[str, float] = {}
        self._out: list[Send] = []
        self._events: list[Any] = []

    # ---- driver API ----------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def hard_state(self) -> HardState:
        return HardState(self.term, self.voted_for, self.config, self.config_shared)

    def ready(self) -> Ready:
        return Ready(tuple(self._out), tuple(self._events), self.hard_state() if self._dirty else None)

    def has_ready(self) -> bool:
        return bool(self._out or self._events or self._dirty)

    def advance(self) -> None:
        """Call after the Ready was persisted and sent."""
        self._out.clear()
        self._events.clear()
        self._dirty = False

    def observe_member(self, node: str, alive: bool, now: float, left: bool = False) -> None:
        """Membership's verdict on ``node``: alive (or suspect) or dead (or ``left``: it said goodbye on a
        graceful shutdown, so a leader removes it from the voters at once instead of after
        ``removal_timeout``). Forgotten members need no call: they stay dead here, so a voter is never
        lost by being reaped."""
        if node == self.id:
            return
        if alive:
            self._alive[node] = None
            self._dead_since.pop(node, None)
        else:
            self._alive.pop(node, None)
            since = now - self.cfg.removal_timeout if left else now
            self._dead_since[node] = min(self._dead_since.get(node, since), since)

    def tick(self, now: float) -> None:
        if self.role is Role.LEADER:
            if now >= self._next_beat:
                self._next_beat = now + self.cfg.heartbeat_interval
                self._broadcast_heartbeat(now)
            self._check_quorum(now)
            if self.role is Role.LEADER:
                self._maybe_change_voters(now)
            return
        if self._may_take_over(now):
            self._take_over(now)
        elif now >= self._deadline:
            self.step(self.id, Hup(), now)

    def step(self, src: str, msg: Any, now: float) -> None:
        """Handle one message (or the local :class:`Hup`). The term is checked first."""
        if isinstance(msg, Hup):
            if self.role is not Role.LEADER:
                self._on_timeout(now)
            return
        if not isinstance(msg, VoteRequest | VoteResponse | Heartbeat | HeartbeatAck):
            raise TypeError(f"election cannot step {type(msg).__name__}")
        if msg.term > self.term:
            if isinstance(msg, VoteRequest) and (msg.pre or self._in_lease(now)):
                if not msg.pre:  # sticky: a live leader exists, do not even adopt the term
                    self._send(src, VoteResponse(term=self.term, pre=False, granted=False))
                    return
            elif isinstance(msg, VoteResponse) and msg.pre and msg.granted:
                pass  # a grant for our pre-vote at term + 1
            else:
                self._become_follower(msg.term, src if isinstance(msg, Heartbeat) else None, now)
        elif msg.term < self.term:
            if isinstance(msg, Heartbeat):  # depose the stale leader
                self._send(src, HeartbeatAck(term=self.term, sent_at=msg.sent_at, success=False))
            elif isinstance(msg, VoteRequest):
                self._send(src, VoteResponse(term=self.term, pre=msg.pre, granted=False))
            return
        if isinstance(msg, VoteRequest):
            self._on_vote_request(src, msg, now)
        else:
            self._step_role(src, msg, now)

    # ---- role handlers -------------------------------------------------------------------------------

    def _step_follower(self, src: str, msg: Any, now: float) -> None:
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(src, msg, now)

    def _step_candidate(self, src: str, msg: Any, now: float) -> None:
        if isinstance(msg, Heartbeat):  # someone won this term
            self._become_follower(msg.term, src, now)
            self._on_heartbeat(src, msg, now)
        elif isinstance(msg, VoteResponse) and msg.pre == (self.role is Role.PRE_CANDIDATE):
            if msg.pre and msg.term not in (self.term, self.term + 1):
                return
            self._votes[src] = msg.granted
            self._tally(now)

    def _step_leader(self, src: str, msg: Any, now: float) -> None:
        if isinstance(msg, HeartbeatAck) and msg.success:
            self._acks[src] = max(self._acks.get(src, NEVER), msg.sent_at)
            if (msg.config_term, msg.config_index) >= self.config.id:
                self._config_acks.add(src)
                if not self.config_shared and set(self.config.voters) <= self._config_acks:
                    self.config_shared, self._dirty = True, True
            if not self.established and self._quorum_since(self._became_at):
                self.established = True
        elif isinstance(msg, Heartbeat) and src < self.id:
            # Two leaders in one term only happen across lineages split by a takeover; lower id wins.
            self._become_follower(self.term, src, now, reason="rival leader")
            self._on_heartbeat(src, msg, now)

    def _on_heartbeat(self, src: str, msg: Heartbeat, now: float) -> None:
        if self.leader is None:
            self.leader = src
            self._events.append(LeaderChanged(self.term, src))
        elif self.leader != src:
            return  # a rival of our leader in the same term: ignore it
        self.heard_at = now
        self._reset_timer(now)
        if msg.config.id != self.config.id:
            self._set_config(msg.config, shared=True)  # our leader, a voter of it, holds it
        cfg = self.config
        ack = HeartbeatAck(
            term=self.term, sent_at=msg.sent_at, success=True, config_term=cfg.term, config_index=cfg.index
        )
        self._send(src, ack)

    def _on_vote_request(self, src: str, msg: VoteRequest, now: float) -> None:
        up_to_date = (msg.config_term, msg.config_index) >= self.config.id
        if msg.pre:
            grant = msg.term > self.term and up_to_date and not self._in_lease(now)
            self._send(src, VoteResponse(term=msg.term if grant else self.term, pre=True, granted=grant))
            return
        grant = (
            self.voted_for in (None, src)
            and self.leader in (None, src)
            and up_to_date
            and self.role is not Role.LEADER
        )
        if grant and self.voted_for is None:
            self.voted_for = src
            self._dirty = True
        if grant:
            self.heard_at = now  # granting counts as contact: stay sticky to this candidate for a lease
            self._reset_timer(now)
        self._send(src, VoteResponse(term=self.term, pre=False, granted=grant))

    # ---- transitions ---------------------------------------------------------------------------------

    def _become_follower(
        self, term: int, leader: str | None, now: float, reason: str = "higher term"
    ) -> None:
        if term < self.term:
            raise IllegalTransition(f"follower of term {term} < current {self.term}")
        if self.role is Role.LEADER:
            self._events.append(SteppedDown(self.term, reason))
        if term > self.term:
            self.term, self.voted_for, self._dirty = term, None, True
        self.role, self._step_role = Role.FOLLOWER, self._step_follower
        if leader != self.leader:
            self.leader = leader
            self._events.append(LeaderChanged(term, leader))
        self._reset_timer(now)

    def _on_timeout(self, now: float) -> None:
        if self.leader is not None and self.role is Role.FOLLOWER:
            self.leader = None
            self._events.append(LeaderChanged(self.term, None))
        self._reset_timer(now)
        if self.config.voters == (self.id,) and self.voted_for == self.id:
            # A sole voter that already voted for itself in this term (a restart) leads it again: nobody
            # else can, and not bumping the term keeps split lineages (see takeover) on their own terms.
            self.role, self._campaign_at, self._votes = Role.CANDIDATE, now, {self.id: True}
            self._become_leader(now)
        elif self.id in self.config.voters:
            self._campaign(now, pre=True)

    def _campaign(self, now: float, pre: bool) -> None:
        if self.role is Role.LEADER:
            raise IllegalTransition("a leader does not campaign")
        if pre:
            self.role, term = Role.PRE_CANDIDATE, self.term + 1
        else:
            self.role, self.term, self.voted_for, self._dirty = Role.CANDIDATE, self.term + 1, self.id, True
            self.leader, term, self._campaign_at = None, self.term, now
        self._step_role = self._step_candidate
        self._votes = {self.id: True}
        cfg = self.config
        req = VoteRequest(term=term, pre=pre, config_term=cfg.term, config_index=cfg.index)
        for voter in cfg.voters:
            if voter != self.id:
                self._send(voter, req)
        self._tally(now)

    def _tally(self, now: float) -> None:
        voters = self.config.voters
        granted = sum(1 for v in voters if self._votes.get(v) is True)
        refused = sum(1 for v in voters if self._votes.get(v) is False)
        need = self.config.majority()
        if granted >= need:
            if self.role is Role.PRE_CANDIDATE:
                self._campaign(now, pre=False)
            else:
                self._become_leader(now)
        elif refused > len(voters) - need:
            self.role, self._step_role = Role.FOLLOWER, self._step_follower

    def _become_leader(self, now: float, takeover: bool = False) -> None:
        if self.role is not Role.CANDIDATE and not takeover:
            raise IllegalTransition(f"{self.role.value} cannot become leader")
        self.role, self._step_role, self.leader = Role.LEADER, self._step_leader, self.id
        self._became_at = self._campaign_at
        self._acks = {v: self._campaign_at for v, ok in self._votes.items() if ok and v != self.id}
        self._config_acks = {self.id}
        self.established = self._quorum_since(self._became_at)
        self._events.append(BecameLeader(self.term, self.config, takeover, self._campaign_at))
        self._events.append(LeaderChanged(self.term, self.id))
        self._next_beat = now + self.cfg.heartbeat_interval
        self._broadcast_heartbeat(now)

    def _may_take_over(self, now: float) -> bool:
        voters = self.config.voters
        if not self.cfg.small_cluster_takeover or len(voters) != 2 or self.id not in voters:
            return False
        if not self.config_shared:
            return False  # the other may never have seen this set and still count a larger, older one
        other = voters[0] if voters[1] == self.id else voters[1]
        since = self._dead_since.get(other)
        return since is not None and now - since >= self.cfg.removal_timeout and not self._in_lease(now)

    def _take_over(self, now: float) -> None:
        rank, size = self.config.voters.index(self.id), len(self.config.voters)
        term = self.term + 1
        term += (rank - term) % size
        self.term, self.voted_for, self.leader = term, self.id, None
        self._campaign_at, self._votes = now, {self.id: True}
        self._set_config(VoterSet(voters=(self.id,), term=term, index=self.config.index + 1), shared=True)
        self._become_leader(now, takeover=True)

    # ---- leader duties -------------------------------------------------------------------------------

    def _broadcast_heartbeat(self, now: float) -> None:
        beat = Heartbeat(term=self.term, sent_at=now, lease=self.cfg.lease, config=self.config)
        targets = dict.fromkeys(self.config.voters)
        targets.update(self._alive)
        for node in targets:
            if node != self.id:
                self._send(node, beat)

    def _quorum_since(self, t: float) -> bool:
        """Did a majority of voters (self included) ack a beat sent at or after ``t``?"""
        n = sum(1 for v in self.config.voters if v == self.id or self._acks.get(v, NEVER) >= t)
        return n >= self.config.majority()

    def _check_quorum(self, now: float) -> None:
        if not self._quorum_since(now - self.cfg.lease):
            self._become_follower(self.term, None, now, reason="lost quorum")

    def _maybe_change_voters(self, now: float) -> None:
        cfg = self.config
        committed = sum(1 for v in cfg.voters if v in self._config_acks) >= cfg.majority()
        if not (self.established and committed):
            return
        timeout = self.cfg.removal_timeout
        gone = [v for v in cfg.voters if v != self.id and now - self._dead_since.get(v, now) >= timeout]
        if gone:
            voters = tuple(v for v in cfg.voters if v != gone[0])
        else:
            fresh = now - self.cfg.lease  # only add a node that answers our beats
            joins = sorted(
                n for n in self._alive if n not in cfg.voters and self._acks.get(n, NEVER) >= fresh
            )
            if not joins:
                return
            voters = tuple(sorted((*cfg.voters, joins[0])))
        self._set_config(VoterSet(voters=voters, term=self.term, index=cfg.index + 1), shared=False)
        self._config_acks = {self.id}
        self._broadcast_heartbeat(now)

    # ---- helpers -------------------------------------------------------------------------------------

    def _in_lease(self, now: float) -> bool:
        return self.role is Role.LEADER or (self.leader is not None and now - self.heard_at < self.cfg.lease)

    def _set_config(self, config: VoterSet, shared: bool) -> None:
        self.config, self.config_shared, self._dirty = config, shared or len(config.voters) == 1, True
        self._events.append(VotersChanged(config))

    def _reset_timer(self, now: float) -> None:
        t = self.cfg.election_timeout
        self._deadline = now + self.rng.uniform(t, 2 * t)

    def _send(self, to: str, msg: Any) -> None:
        self._out.append(Send(to, msg))

"""The asyncio I/O edge of the cluster: drives this node's MembershipCore and ElectionCore over HTTP.

Wire: every message is one sealed envelope (:mod:`aivailable.gossip.envelope`) in the body of
``POST /_cluster/gossip`` on the node's own aiohttp port; the answer is ``204`` and carries nothing (a
reply is a POST of its own, to the sender's gossiped address). A body that does not open (oversized,
malformed, unknown version or type, missing or bad signature, stale, replayed) is dropped with a 4xx,
counted in ``aivailable_cluster_rejected_total{reason}`` and logged at most once a minute per peer
address. The size limit is enforced on ``Content-Length`` and while reading, never after.

Driver loop (one owner: the event loop; no locks): every ``tick_interval`` and after every inbound
message, :meth:`ClusterTransport._drain` takes each core's ``Ready``, writes ``persist`` (the election
``HardState``) to a diskcache in ``state_dir/cluster`` *before* sending anything of that Ready, then
sends (one task per message, concurrently, dropped on failure or after ``send_timeout``: SWIM handles
loss), then handles events, then ``advance()``. A state directory that cannot be read refuses to start
(:class:`ClusterStateError`), one that cannot be written stops the transport: a node must never forget
a vote it gave.

Bootstrap rule (a node with a persisted term or voter set never bootstraps, it resumes):

* No ``join()`` seeds and nobody discovered within ``bootstrap_grace`` (2 s): found a new cluster as its
  single voter and elect itself at once.
* Otherwise join as a non-voter; the leader adds live non-voters that ack its beats one at a time.
* Several brand-new nodes that found each other (mDNS, or ``--join`` pointing at each other) and see no
  established node: each advertises ``{"_cluster": {"bootstrapped": bool}}`` in its facts (the key is
  reserved and hidden from :meth:`members`); once the facts of every live peer are known and none is
  bootstrapped, the node with the lowest id founds the cluster and the others are added by it. A node
  that knows of peers never founds alone, so a restarted node with a wiped disk waits for its cluster.
* Before founding by that rule, a node also waits (up to ``seed_wait``, 30 s) for every join seed to
  answer: peers that found it first are not the whole story. Without this wait, ``b --join a`` and
  ``c --join a,b`` started before ``a`` was listening made ``b`` found a cluster with ``c`` while ``a``
  founded its own. Seeds that have not answered are retried every ``reconnect_interval`` for as long
  as they stay silent (membership), so should two clusters ever form anyway (a seed silent past
  ``seed_wait``, or mDNS slower than ``bootstrap_grace``), they meet once the seed answers, and the
  election's rule for two lineages merges them into one (the higher term, then the lower leader id).

Placement delivery: :meth:`publish_placement` (leader only) stamps ``(term, version)``, applies it
locally through the :class:`PlacementFence` (``on_placement`` fires for the leader too), and sends it
to every live member. A 2xx answer is the member's acknowledgement; every ``placement_resend`` the
leader re-sends it to live members that have not acknowledged it, and every ``placement_refresh`` to
all of them (a member that restarted from scratch gets it again). Members accept it only through the
fence; the accepted placement is persisted with the hard state.

Cluster secret: :func:`load_or_create_secret`; never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import diskcache
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from aivailable.api.errors import abandon_body
from aivailable.errors import ConfigError, NodeError
from aivailable.gossip import envelope
from aivailable.gossip.election import (
    BecameLeader,
    ElectionConfig,
    ElectionCore,
    HardState,
    Hup,
    LeaderChanged,
    SteppedDown,
    VotersChanged,
)
from aivailable.gossip.fencing import PlacementFence
from aivailable.gossip.members import LIVE
from aivailable.gossip.membership import (
    FactsChanged,
    MemberChanged,
    MembershipConfig,
    MembershipCore,
    Refuted,
)
from aivailable.gossip.messages import (
    ELECTION_TYPES,
    MEMBERSHIP_TYPES,
    PlacementPublish,
    Send,
    Status,
    VoterSet,
)

__all__ = [
    "GOSSIP_PATH",
    "ClusterStateError",
    "ClusterTransport",
    "MemberView",
    "NotLeaderError",
    "TransportConfig",
    "join_instructions",
    "load_or_create_secret",
]

log = logging.getLogger("aivailable.cluster")

GOSSIP_PATH = "/_cluster/gossip"
CLUSTER_KEY = "_cluster"  # reserved facts key: this transport's own bootstrap flag
SECRET_FILE = "cluster_secret"
MIN_SECRET_CHARS = 16  # shorter secrets can be guessed offline from the cluster id hash mDNS announces
_STATUS_FOR = envelope.REJECT_STATUS


class Refused(Exception):
    """A signed inter-node request refused before its message is looked at: `reason` is what the sender
    is told and what is counted; `abandon` when its body was not read to the end."""

    def __init__(self, reason: str, detail: str, *, abandon: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.abandon = reason, detail, abandon

    def answer(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """`resp` (the caller's refusal), closing the connection when the body was left unread."""
        if self.abandon:
            abandon_body(request, resp)
        return resp


async def open_signed(request: web.Request, secret: bytes, replay: envelope.ReplayCache, *, own_id: str,
                      max_bytes: int, timeout_s: float) -> tuple[str, Any]:
    """Read one signed envelope (at most `max_bytes`, within `timeout_s`) and open it: (sender, message).
    Raises Refused for anything else, a message signed with `own_id` included. Gossip and model-file
    requests (files/serve.py) are received with it."""
    try:
        async with asyncio.timeout(timeout_s):
            if request.content_length is not None and request.content_length > max_bytes:
                raise envelope.Oversized(f"Content-Length {request.content_length} > {max_bytes}")
            buf = bytearray()
            async for chunk in request.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > max_bytes:
                    raise envelope.Oversized(f"body over {max_bytes} bytes")
        src, msg = envelope.open(bytes(buf), secret, time.time(), replay, max_bytes=max_bytes)
    except envelope.EnvelopeError as exc:
        raise Refused(exc.reason, str(exc)) from None
    except TimeoutError:
        raise Refused("timeout", f"body not received within {timeout_s:g} s", abandon=True) from None
    except Exception as exc:  # e.g. a corrupt gzip body, or a frame the codec did not foresee: never a 500
        raise Refused("malformed", type(exc).__name__, abandon=True) from None
    if src == own_id:
        raise Refused("own_id", f"a message signed as this node's id {src!r}")
    return src, msg


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Timers in seconds. Field defaults are the LAN profile; :meth:`local` is a delta from it."""

    tick_interval: float = 0.05  # cores' tick period; finer than every core timer
    bootstrap_grace: float = 2.0  # wait this long for seeds/discovered peers before founding alone
    seed_wait: float = 30.0  # new nodes wait this long for every join seed to answer before founding
    send_timeout: float = 1.0  # one POST, connect included; a later answer is useless to SWIM anyway
    max_inflight_per_peer: int = 32  # POSTs in flight to one address; beyond it messages are dropped
    placement_resend: float = 0.5  # leader re-sends the placement to live members that did not ack it
    placement_refresh: float = 10.0  # ... and to every live member this often (restarted from scratch)
    max_bytes: int = envelope.MAX_BYTES  # one envelope; larger bodies are refused unread (413)
    read_timeout: float = 5.0  # a whole body must arrive within this (slow senders are dropped)
    reject_log_interval: float = 60.0  # at most one warning per peer address per interval
    events_max: int = 200  # entries kept in :attr:`ClusterTransport.events`

    @classmethod
    def lan(cls) -> TransportConfig:
        return cls()

    @classmethod
    def local(cls) -> TransportConfig:
        """All nodes on one host (development, tests)."""
        return replace(cls.lan(), bootstrap_grace=0.5, seed_wait=5.0, placement_resend=0.2, placement_refresh=2.0)

    def validate(self) -> TransportConfig:
        for name in (
            "tick_interval",
            "send_timeout",
            "placement_resend",
            "placement_refresh",
            "read_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds", param=name)
        for name in ("bootstrap_grace", "seed_wait"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds", param=name)
        if self.max_inflight_per_peer < 1:
            raise ConfigError("max_inflight_per_peer must be >= 1", param="max_inflight_per_peer")
        if self.max_bytes < 1024:
            raise ConfigError("max_bytes must be >= 1024", param="max_bytes")
        return self


class ClusterStateError(NodeError):
    """The persisted cluster state cannot be read or written; the node must not run without it."""


class NotLeaderError(NodeError):
    """Only the leader publishes placements; ``leader_hint`` is the leader this node knows, if any."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "not_leader"

    def __init__(self, leader_hint: str | None):
        super().__init__(f"this node is not the cluster leader (leader: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member as this node sees it (this node included). ``status``: alive/suspect/dead/left."""

    node_id: str
    address: str
    status: str
    incarnation: int
    facts: dict[str, Any]
    facts_version: int


# ---- persistence -----------------------------------------------------------------------------------------


class StateStore:
    """HardState and the accepted placement in a diskcache (SQLite, ``synchronous=FULL``, no eviction)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(path), eviction_policy="none", sqlite_synchronous=2)
            self.hard_state = _parse_hard_state(self._read("hard_state"))
            self.placement = _parse_placement(self._read("placement"))
        except Exception as exc:
            cause = f"{exc.strerror} ({exc.filename or path})" if isinstance(exc, OSError) else str(exc)
            raise ClusterStateError(
                f"cannot read the cluster state in {path}: {cause}. It holds this node's election term and "
                f"vote, which it must never forget (it could vote twice in one term), so the node refuses to "
                f"start. If the disk is fine and only these files are damaged: `mv {path} {path}.bad`, then "
                f"start the node with --join HOST:PORT of a live member; it rejoins as a new member"
            ) from exc

    def _read(self, key: str) -> Any:
        raw = self._cache.get(key)
        return None if raw is None else json.loads(raw)

    def _write(self, key: str, value: Any) -> None:
        try:
            self._cache.set(key, json.dumps(value, separators=(",", ":")))
        except Exception as exc:
            raise ClusterStateError(
                f"cannot write the cluster state in {self.path}: {exc}. This node stops taking part in the "
                f"cluster (it keeps serving the models it has loaded); free space or fix the disk (`df -h "
                f"{self.path}`), then restart it: its term and vote on disk are intact"
            ) from exc

    def save_hard_state(self, hs: HardState) -> None:
        c = hs.config
        self._write(
            "hard_state",
            {
                "term": hs.term,
                "voted_for": hs.voted_for,
                "voters": list(c.voters),
                "config_term": c.term,
                "config_index": c.index,
                "config_shared": hs.config_shared,
            },
        )
        self.hard_state = hs

    def save_placement(self, term: int, version: int, assignments: dict[str, Any]) -> None:
        self._write("placement", {"term": term, "version": version, "assignments": assignments})
        self.placement = (term, version, assignments)

    def close(self) -> None:
        self._cache.close()


def _parse_hard_state(obj: Any) -> HardState | None:
    if obj is None:
        return None
    term, voted, voters = obj["term"], obj["voted_for"], obj["voters"]
    cterm, cindex = obj["config_term"], obj["config_index"]
    ints = (term, cterm, cindex)
    if not all(isinstance(i, int) and i >= 0 for i in ints) or not isinstance(voters, list):
        raise ValueError("hard_state has bad fields")
    if not (voted is None or isinstance(voted, str)) or not all(isinstance(v, str) for v in voters):
        raise ValueError("hard_state has bad node ids")
    shared = obj.get("config_shared", True)  # absent in state written before it existed
    if not isinstance(shared, bool):
        raise ValueError("hard_state has a bad config_shared")
    return HardState(term, voted, VoterSet(voters=tuple(voters), term=cterm, index=cindex), shared)


def _parse_placement(obj: Any) -> tuple[int, int, dict[str, Any]] | None:
    if obj is None:
        return None
    term, version, assignments = obj["term"], obj["version"], obj["assignments"]
    if not (isinstance(term, int) and isinstance(version, int) and isinstance(assignments, dict)):
        raise ValueError("placement has bad fields")
    return term, version, assignments


# ---- the driver ------------------------------------------------------------------------------------------


class ClusterTransport:
    """Runs membership + election for ``node_id`` over HTTP; see the module docstring.

    Callbacks (plain functions; a returned awaitable is run as a task; exceptions are logged):
    ``on_placement(term, version, assignments)`` for every placement the fence accepts (this node's own
    publications included), after it is persisted; ``on_change()`` at most once per drained batch in
    which membership, a member's facts, the leader or the voter set changed.
    """

    def __init__(
        self,
        node_id: str,
        advertise: str,
        secret: bytes,
        state_dir: Path,
        *,
        membership: MembershipConfig | None = None,
        election: ElectionConfig | None = None,
        config: TransportConfig | None = None,
        seed: int | None = None,
        registry: CollectorRegistry | None = None,
        on_placement: Callable[[int, int, dict[str, Any]], Any] | None = None,
        on_change: Callable[[], Any] | None = None,
    ):
        if not secret:
            raise ConfigError("the cluster secret is empty", param="cluster_secret")
        self.node_id, self.advertise = node_id, _check_addr(advertise)
        self._secret = bytes(secret)
        self.cfg = (config or TransportConfig.lan()).validate()
        self._election_cfg = (election or ElectionConfig.lan()).validate()
        self.on_placement, self.on_change = on_placement, on_change
        self._rng = random.Random(seed)
        now = time.monotonic()
        self._store = StateStore(Path(state_dir) / "cluster")
        self.mem = MembershipCore(
            node_id,
            self.advertise,
            membership or MembershipConfig.lan(),
            random.Random(self._rng.random()),
            now,
        )
        self.elect = ElectionCore(
            node_id, self._election_cfg, random.Random(self._rng.random()), now, state=self._store.hard_state
        )
        self.fence = PlacementFence(highest_term=self.elect.term)
        self._placement = self._store.placement
        if self._placement is not None:
            self.fence.observe_term(self._placement[0])
            self.fence.term, self.fence.version = self._placement[0], self._placement[1]
        self._user_facts: dict[str, Any] = {}
        self._flag = self._bootstrapped()
        self.mem.set_facts(self._facts())
        self._seeds: list[str] = []
        self._seed_wait_logged = False
        self._replay = envelope.ReplayCache()
        self._events: deque[tuple[float, str]] = deque(maxlen=self.cfg.events_max)
        self._published: PlacementPublish | None = None
        self._acked: dict[str, tuple[int, int]] = {}
        self._pl_inflight: set[str] = set()
        self._next_resend = self._next_refresh = 0.0
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._started_at = now
        self._closing = False
        self.failed: BaseException | None = None
        self._reject_logged: dict[str, float] = {}
        self.rejections: dict[str, int] = {}  # reason -> count, for the status page (also in /metrics)
        self._error_logged = float("-inf")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._rejected = Counter(
            "aivailable_cluster_rejected_total",
            "Inter-node messages dropped before reaching the cluster cores, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._send_failed = Counter(
            "aivailable_cluster_send_failures_total",
            "Inter-node messages that could not be delivered (dropped; SWIM tolerates loss)",
            ["why"],
            registry=self.registry,
        )

    # ---- queries -----------------------------------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        return self.elect.leader

    @property
    def term(self) -> int:
        return self.elect.term

    @property
    def is_leader(self) -> bool:
        return self.elect.is_leader

    @property
    def voters(self) -> tuple[str, ...]:
        return self.elect.config.voters

    @property
    def voted_for(self) -> str | None:
        return self.elect.voted_for

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def events(self) -> list[tuple[float, str]]:
        """Recent membership and leadership changes as ``(unix time, text)``, oldest first."""
        return list(self._events)

    def placement(self) -> tuple[int, int, dict[str, Any]] | None:
        """The latest accepted placement ``(term, version, assignments)`` (persisted across restarts)."""
        return self._placement

    def facts_stamp(self) -> tuple:
        """A cheap fingerprint of what `members()` says: equal stamps, equal members and facts.

        Each node's facts carry a version that its owner bumps on every change, so views derived from the
        members (the merged catalog, the replicas to route to) can be cached per stamp instead of rebuilt
        for every request."""
        own = self.mem.status(self.node_id)
        rows: list[tuple] = [(self.node_id, own.value if own else "alive", self.mem.facts_version)]
        for node in self.mem.known_members():
            m = self.mem.member(node)
            if m is not None:
                rows.append((node, m.status.value, m.addr, m.incarnation, (self.mem.facts(node) or (0,))[0]))
        return tuple(rows)

    def members(self) -> list[MemberView]:
        own_status = self.mem.status(self.node_id)
        rows = [
            MemberView(
                self.node_id,
                self.advertise,
                own_status.value if own_status else "alive",
                self.mem.incarnation,
                dict(self._user_facts),
                self.mem.facts_version,
            )
        ]
        for node in self.mem.known_members():
            m = self.mem.member(node)
            if m is None:
                continue
            version, facts = self.mem.facts(node) or (0, {})
            public = {k: v for k, v in facts.items() if k != CLUSTER_KEY}
            rows.append(MemberView(node, m.addr, m.status.value, m.incarnation, public, version))
        return sorted(rows, key=lambda r: r.node_id)

    # ---- node API ----------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [web.post(GOSSIP_PATH, self._handle)]

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("ClusterTransport already started")
        timeout = aiohttp.ClientTimeout(total=self.cfg.send_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._started_at = now = time.monotonic()
        self._note(f"started (term {self.term}, voters {', '.join(self.voters) or 'none'})")
        if self._seeds:
            self.mem.join(list(self._seeds))
        self._drain(now)
        self._task = asyncio.create_task(self._run(), name=f"cluster-{self.node_id}")

    async def stop(self, leave: bool = True) -> None:
        """Leave gracefully (peers mark this node *left* at once), then stop sending and close."""
        if self._task is not None and leave and self.failed is None and not self._task.done():
            self.mem.leave()
            try:
                self._drain(time.monotonic())
            except ClusterStateError as exc:
                self._fail(exc)
            await asyncio.sleep(min(1.0, 3 * self.mem.cfg.gossip_interval))
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.cfg.send_timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._store.close()

    def join(self, addrs: list[str] | str) -> None:
        """Add seed addresses ("host:port"; one string is one address, so ``join`` can be discovery's
        ``on_peer``); their members answer with the cluster. Membership re-pushes to the seeds every
        ``reconnect_interval`` while this node knows no live peer. Safe to call again with known ones."""
        addrs = [addrs] if isinstance(addrs, str) else addrs
        new = [a for a in map(_check_addr, addrs) if a != self.advertise and a not in self._seeds]
        if not new:
            return
        self._seeds.extend(new)
        if self.running:
            self.mem.join(list(self._seeds))
            self._drain(time.monotonic())

    def set_facts(self, facts: dict[str, Any]) -> None:
        """This node's facts (JSON-able; key ``_cluster`` is reserved), disseminated by membership."""
        json.dumps(facts)  # raises TypeError now rather than in every peer's decoder
        self._user_facts = dict(facts)
        self.mem.set_facts(self._facts())

    def publish_placement(self, assignments: dict[str, Any]) -> tuple[int, int]:
        """Leader only: stamp, apply locally, deliver to every live member until acknowledged."""
        json.dumps(assignments)
        if not self.elect.is_leader:
            raise NotLeaderError(self.elect.leader)
        term = self.elect.term
        self.fence.observe_term(term)
        last = self._published.version if self._published is not None else 0
        version = max(self.fence.version, last) + 1
        if not self.fence.accept(term, version):  # a newer term was seen: we are deposed
            raise NotLeaderError(None)
        msg = PlacementPublish(term=term, version=version, assignments=assignments)
        try:
            self._apply_placement(msg)  # persisted before anyone is told
        except ClusterStateError as exc:
            self._fail(exc)
            raise
        self._published, self._acked = msg, {}
        self._next_resend = 0.0
        self._resend_placement(time.monotonic())
        return term, version

    # ---- the loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.cfg.tick_interval
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                self.mem.tick(now)
                self.elect.tick(now)
                self._maybe_bootstrap(now)
                self._resend_placement(now)
                self._drain(now)
            except ClusterStateError as exc:
                self._fail(exc)
                return
            except Exception:
                if now - self._error_logged >= self.cfg.reject_log_interval:
                    self._error_logged = now
                    log.exception("cluster tick failed (continuing)")
            next_at = max(next_at + interval, now)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _drain(self, now: float) -> None:
        """Persist, send, handle events, advance: for each core until it has nothing ready."""
        changed = False
        for core in (self.mem, self.elect):
            while core.has_ready():
                rd = core.ready()
                if rd.persist is not None:
                    self._store.save_hard_state(rd.persist)  # before any message of this Ready leaves
                for send in rd.messages:
                    self._send(send)
                for ev in rd.events:
                    changed = self._on_event(ev, now) or changed
                core.advance()
        self.fence.observe_term(self.elect.term)
        if self._bootstrapped() != self._flag:
            self._flag = not self._flag
            self.mem.set_facts(self._facts())
        if changed and self.on_change is not None:
            self._call(self.on_change)

    def _on_event(self, ev: Any, now: float) -> bool:
        match ev:
            case MemberChanged():
                if ev.new is not None:
                    self.elect.observe_member(ev.node, ev.new in LIVE, now, left=ev.new is Status.LEFT)
                    if ev.new in LIVE and ev.old not in LIVE:
                        self._acked.pop(ev.node, None)  # (re)joined: deliver the placement again
                old = ev.old.value if ev.old else "new"
                self._note(f"member {ev.node}: {old} -> {ev.new.value if ev.new else 'forgotten'}")
            case FactsChanged():
                pass
            case Refuted():
                self._note(f"refuted a suspicion of this node (incarnation {ev.incarnation})")
                return False
            case LeaderChanged():
                self._note(f"leader: {ev.leader or 'unknown'} (term {ev.term})")
            case BecameLeader():
                self._published = None
                how = " by takeover" if ev.takeover else ""
                self._note(f"this node leads term {ev.term}{how}; voters {', '.join(ev.config.voters)}")
            case SteppedDown():
                self._published = None
                self._note(f"stepped down in term {ev.term}: {ev.reason}")
            case VotersChanged():
                self._note(f"voters: {', '.join(ev.config.voters)}")
            case _:
                return False
        return True

    def _maybe_bootstrap(self, now: float) -> None:
        """The bootstrap rule of the module docstring."""
        if self._bootstrapped() or now - self._started_at < self.cfg.bootstrap_grace:
            return
        peers = [n for n in self.mem.live_members() if n != self.node_id]
        if not peers:
            if self._seeds:
                return  # told to join: never found a cluster alone
            why = "no join seeds and no peers found"
        else:
            for node in peers:
                facts = (self.mem.facts(node) or (0, {}))[1].get(CLUSTER_KEY)
                if not isinstance(facts, dict) or facts.get("bootstrapped") is not False:
                    return  # unknown yet, or an established cluster: its leader will add us
            if min(peers) < self.node_id:
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
            self.node_id, self._election_cfg, random.Random(self._rng.random()), now, voters=(self.node_id,)
        )
        for node in self.mem.known_members():
            m = self.mem.member(node)
            if m is not None:
                self.elect.observe_member(node, m.status in LIVE, now)
        self._note(f"bootstrapped a new cluster as its only voter ({why})")
        log.info("cluster: %s bootstrapped a new cluster as its only voter (%s)", self.node_id, why)
        self.elect.step(self.node_id, Hup(), now)  # campaign now rather than after an election timeout

    def _wait_for_seeds(self, silent: list[str], now: float) -> bool:
        """Founding by the lowest-id rule waits for the ``silent`` join seeds, up to ``seed_wait``."""
        if now - self._started_at < self.cfg.seed_wait:
            if not self._seed_wait_logged:
                self._seed_wait_logged = True
                self._note(
                    f"waiting up to {self.cfg.seed_wait:g} s for join seed(s) {', '.join(silent)} "
                    "to answer before founding a cluster"
                )
                log.info(
                    "cluster: %s and its new peers could found a cluster, but join seed(s) %s have not answered "
                    "yet; waiting up to %g s for them, so that two clusters do not form",
                    self.node_id,
                    ", ".join(silent),
                    self.cfg.seed_wait,
                )
            return True
        log.warning(
            "cluster: join seed(s) %s did not answer within %g s; founding without them. If a cluster runs "
            "there, the two merge once they reach each other (check --join and that those nodes are up)",
            ", ".join(silent),
            self.cfg.seed_wait,
        )
        return False

    def _bootstrapped(self) -> bool:
        return self.elect.term > 0 or bool(self.elect.config.voters)

    def _facts(self) -> dict[str, Any]:
        return {**self._user_facts, CLUSTER_KEY: {"bootstrapped": self._bootstrapped()}}

    # ---- placement -------------------------------------------------------------------------------------

    def _apply_placement(self, msg: PlacementPublish) -> None:
        self._store.save_placement(msg.term, msg.version, msg.assignments)
        self._placement = (msg.term, msg.version, msg.assignments)
        if self.on_placement is not None:
            self._call(self.on_placement, msg.term, msg.version, msg.assignments)

    def _resend_placement(self, now: float) -> None:
        p = self._published
        if p is None:
            return
        if not self.elect.is_leader or self.elect.term != p.term:
            self._published = None
            return
        if now >= self._next_refresh:
            self._next_refresh = now + self.cfg.placement_refresh
            self._acked.clear()
        if now < self._next_resend:
            return
        self._next_resend = now + self.cfg.placement_resend
        want = (p.term, p.version)
        for node in self.mem.live_members():
            if node == self.node_id or self._acked.get(node) == want or node in self._pl_inflight:
                continue
            m = self.mem.member(node)
            if m is None:
                continue

            def done(ok: bool, node: str = node) -> None:
                self._pl_inflight.discard(node)
                if ok:
                    self._acked[node] = want

            if self._post(m.addr, p, done):
                self._pl_inflight.add(node)

    # ---- sending ---------------------------------------------------------------------------------------

    def _send(self, send: Send) -> None:
        if send.to == self.node_id:
            return
        addr = send.addr
        if addr is not None:  # a push to a join seed: note when one answers
            self._post(addr, send.msg, lambda ok, a=addr: self._seed_pushed(a, ok))
            return
        m = self.mem.member(send.to)
        if m is None:
            self._send_failed.labels(why="no_address").inc()
            return
        self._post(m.addr, send.msg)

    def _seed_pushed(self, addr: str, ok: bool) -> None:
        if ok:
            self.mem.seed_answered(addr, time.monotonic())

    def _post(self, addr: str, msg: Any, done: Callable[[bool], None] | None = None) -> bool:
        if self._session is None or self._closing:
            return False
        if self._inflight.get(addr, 0) >= self.cfg.max_inflight_per_peer:
            self._send_failed.labels(why="backlog").inc()
            return False
        data = envelope.seal(msg, self._secret, self.node_id, time.time(), os.urandom(12))
        task = asyncio.create_task(self._deliver(addr, data, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _deliver(self, addr: str, data: bytes, done: Callable[[bool], None] | None) -> None:
        assert self._session is not None
        self._inflight[addr] = self._inflight.get(addr, 0) + 1
        ok = False
        try:
            async with self._session.post(f"http://{addr}{GOSSIP_PATH}", data=data) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    self._send_failed.labels(why=f"http_{resp.status}").inc()
        except (aiohttp.ClientError, TimeoutError, OSError):
            self._send_failed.labels(why="unreachable").inc()
        finally:
            left = self._inflight[addr] - 1
            if left:
                self._inflight[addr] = left
            else:
                del self._inflight[addr]
            if done is not None:
                done(ok)

    # ---- receiving -------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "unknown"
        if not self.running or self._closing:
            return web.Response(status=503, text="cluster transport not running")
        try:
            src, msg = await open_signed(request, self._secret, self._replay, own_id=self.node_id,
                                         max_bytes=self.cfg.max_bytes, timeout_s=self.cfg.read_timeout)
        except Refused as r:
            return r.answer(request, self._reject(peer, r.reason, r.detail))
        now = time.monotonic()
        try:
            if isinstance(msg, MEMBERSHIP_TYPES):
                self.mem.step(src, msg, now)
            elif isinstance(msg, ELECTION_TYPES):
                self.elect.step(src, msg, now)
            elif isinstance(msg, PlacementPublish):
                self.fence.observe_term(self.elect.term)
                if self.fence.accept(msg.term, msg.version):
                    self._apply_placement(msg)
            self._drain(now)
        except ClusterStateError as exc:
            self._fail(exc)
            return web.Response(status=503, text="cluster state not writable")
        except Exception:  # a core bug must not take the HTTP server down; the next tick drains the rest
            if now - self._error_logged >= self.cfg.reject_log_interval:
                self._error_logged = now
                log.exception("cluster core failed on a %s from %s", type(msg).__name__, src)
            return web.Response(status=500, text="internal error")
        return web.Response(status=204)

    def count_rejection(self, reason: str) -> None:
        """Count a refused inter-node request (gossip or model-file) for /metrics and the status page."""
        self._rejected.labels(reason=reason).inc()
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _reject(self, peer: str, reason: str, detail: str) -> web.Response:
        self.count_rejection(reason)
        now = time.monotonic()
        last = self._reject_logged.get(peer)
        if last is None or now - last >= self.cfg.reject_log_interval:
            if len(self._reject_logged) > 4096:
                horizon = now - self.cfg.reject_log_interval
                self._reject_logged = {p: t for p, t in self._reject_logged.items() if t > horizon}
            self._reject_logged[peer] = now
            log.warning(
                "dropped a cluster message from %s: %s (%s); drops are counted in "
                "aivailable_cluster_rejected_total and logged once a minute per address",
                peer,
                reason,
                detail,
            )
        resp = web.Response(status=_STATUS_FOR.get(reason, 400), text=reason)
        if reason == "oversized":
            resp.force_close()
        return resp

    # ---- helpers ---------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        self._closing = True
        log.critical("cluster transport stopped: %s", exc)
        self._note(f"stopped: {exc}")

    def _note(self, text: str) -> None:
        self._events.append((time.time(), text))

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            result = fn(*args)
        except Exception:
            log.exception("cluster callback %s failed", getattr(fn, "__name__", fn))
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _check_addr(addr: str) -> str:
    """``host:port`` (``[v6]:port``); raises ConfigError naming the bad value."""
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad cluster address {addr!r}: expected HOST:PORT", param="join")
    return f"{host}:{int(port)}"


# ---- cluster secret --------------------------------------------------------------------------------------


def load_or_create_secret(
    state_dir: Path | str, secret: str | None = None, secret_file: str | Path | None = None
) -> tuple[bytes, bool]:
    """The cluster secret: ``secret`` (flag) or ``secret_file`` wins; else ``state_dir/cluster_secret``;
    else a new random one stored there with mode 0600. Returns ``(secret, created)``; when created, show
    the operator :func:`join_instructions`. The secret itself is never logged."""
    if secret is not None and secret_file is not None:
        raise ConfigError("give --cluster-secret or --cluster-secret-file, not both", param="cluster_secret")
    if secret is not None:
        return _checked(secret, "cluster_secret", "--cluster-secret"), False
    if secret_file is not None:
        path = Path(secret_file).expanduser()
        return _checked(_read_secret(path, "cluster_secret_file"), "cluster_secret_file", str(path)), False
    path = Path(state_dir).expanduser() / SECRET_FILE
    if path.exists():
        return _checked(_read_secret(path, "state_dir"), "state_dir", str(path)), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (value + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileExistsError:  # another process created it meanwhile: use theirs
        return _checked(_read_secret(path, "state_dir"), "state_dir", str(path)), False
    except OSError as exc:
        raise ConfigError(f"cannot create the cluster secret file {path}: {exc}", param="state_dir") from exc
    log.info("created a new cluster secret in %s (mode 0600)", path)
    return value.encode(), True


def join_instructions(advertise: str, state_dir: Path | str) -> str:
    """What to tell the operator after :func:`load_or_create_secret` created a secret."""
    path = Path(state_dir).expanduser() / SECRET_FILE
    return (
        f"Created a new cluster secret in {path}. To add another machine, copy that file to it "
        f"(keep it private: mode 0600) and run there:\n"
        f"  aivailable up --join {advertise} --cluster-secret-file {path}"
    )


def _read_secret(path: Path, param: str) -> str:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret file {path}: {exc}", param=param) from exc
    if mode & 0o077:
        log.warning(
            "the cluster secret file %s is readable by other users (mode %o); chmod 600 it",
            path,
            mode & 0o777,
        )
    return text


def _checked(value: str, param: str, where: str) -> bytes:
    value = value.strip()
    if not value:
        raise ConfigError(f"the cluster secret from {where} is empty", param=param)
    if len(value) < MIN_SECRET_CHARS:
        log.warning(
            "the cluster secret from %s is short (%d characters): mDNS announces a hash of it, so it can "
            "be guessed offline; use 32 or more random characters",
            where,
            len(value),
        )
    return value.encode()

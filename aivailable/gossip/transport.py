"""The asyncio + HTTP driver of this node's :class:`~aivailable.gossip.node_core.NodeCore`.

Every protocol decision (membership, election, fence, founding a cluster and the wait for join seeds,
mDNS candidates, placement delivery with acks and re-sends) is in the sans-IO node core, which the
simulator (:mod:`aivailable.gossip.sim`) drives too; this module only moves bytes and time.

Wire: every message is one sealed envelope (:mod:`aivailable.gossip.envelope`) in the body of
``POST /_cluster/gossip`` on the node's own aiohttp port; the answer is ``204`` and carries nothing (a
reply is a POST of its own, to the sender's gossiped address). A body that does not open (oversized,
malformed, unknown version or type, missing or bad signature, stale, replayed) is dropped with a 4xx
(:func:`~aivailable.gossip.signed.open_signed`), counted in ``aivailable_cluster_rejected_total{reason}``
and logged at most once a minute per peer address.

Driver loop (one owner: the event loop; no locks): every ``tick_interval`` and after every inbound
message or send outcome, :meth:`ClusterTransport._drain` takes the core's ``NodeReady``, writes the
election ``HardState`` and the accepted placement (:class:`~aivailable.gossip.state_store.StateStore`)
*before* sending anything of it, then sends (one task per message, concurrently, dropped on failure or
after ``send_timeout``; each outcome goes back to the core when it asked for one), then logs the core's
notes and calls ``on_placement``/``on_change``. A state directory that cannot be read refuses to start
(:class:`ClusterStateError`), one that cannot be written stops the transport.

Configuration and the member rows it reports: :mod:`aivailable.gossip.transport_types`; the cluster
secret: :mod:`aivailable.gossip.secret`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from aivailable.errors import ConfigError
from aivailable.gossip import envelope, tls
from aivailable.gossip.election import ElectionConfig, ElectionCore
from aivailable.gossip.membership import MembershipCore
from aivailable.gossip.membership_types import MembershipConfig
from aivailable.gossip.messages import ELECTION_TYPES, MEMBERSHIP_TYPES, PlacementPublish
from aivailable.gossip.node_core import CLUSTER_KEY, NodeCore, Note, Outbound
from aivailable.gossip.peerhttp import PeerDialer
from aivailable.gossip.signed import Refused, open_signed
from aivailable.gossip.state_store import ClusterStateError, StateStore
from aivailable.gossip.transport_types import MemberView, NotLeaderError, TransportConfig

__all__ = ["GOSSIP_PATH", "ClusterTransport"]

log = logging.getLogger("aivailable.cluster")

GOSSIP_PATH = "/_cluster/gossip"
_STATUS_FOR = envelope.REJECT_STATUS


# ---- the driver ------------------------------------------------------------------------------------------


class ClusterTransport:
    """Drives this node's :class:`NodeCore` over HTTP; see the module docstring.

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
        dialer: PeerDialer | None = None,
    ):
        if not secret:
            raise ConfigError("the cluster secret is empty", param="cluster_secret")
        self.node_id, self.advertise = node_id, _check_addr(advertise)
        self._secret = bytes(secret)
        self.cfg = (config or TransportConfig.lan()).validate()
        self.on_placement, self.on_change = on_placement, on_change
        self.dialer = dialer or PeerDialer()
        self._store = StateStore(Path(state_dir) / "cluster")
        core_cfg = self.cfg.core(membership or MembershipConfig.lan(), election or ElectionConfig.lan())
        self.core = NodeCore(
            node_id,
            self.advertise,
            core_cfg,
            random.Random(seed),
            time.monotonic(),
            hard_state=self._store.hard_state,
            placement=self._store.placement,
        )
        self.core.advance()  # the restored state is on disk already
        self._replay = envelope.ReplayCache()
        self._events: deque[tuple[float, str]] = deque(maxlen=self.cfg.events_max)
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
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
    def mem(self) -> MembershipCore:
        return self.core.mem

    @property
    def elect(self) -> ElectionCore:
        return self.core.elect

    @property
    def leader(self) -> str | None:
        return self.core.leader

    @property
    def term(self) -> int:
        return self.core.term

    @property
    def is_leader(self) -> bool:
        return self.core.is_leader

    @property
    def voters(self) -> tuple[str, ...]:
        return self.core.elect.config.voters

    @property
    def voted_for(self) -> str | None:
        return self.core.elect.voted_for

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def events(self) -> list[tuple[float, str]]:
        """Recent membership and leadership changes as ``(unix time, text)``, oldest first."""
        return list(self._events)

    def placement(self) -> tuple[int, int, dict[str, Any]] | None:
        """The latest accepted placement ``(term, version, assignments)``, once persisted (it survives
        restarts; one the disk refused is not accepted)."""
        return self._store.placement

    def facts_stamp(self) -> tuple:
        """A cheap fingerprint of what `members()` says: equal stamps, equal members and facts.

        Each node's facts carry a version that its owner bumps on every change, so views derived from the
        members (the merged catalog, the replicas to route to) can be cached per stamp instead of rebuilt
        for every request."""
        mem = self.core.mem
        own = mem.status(self.node_id)
        rows: list[tuple] = [(self.node_id, own.value if own else "alive", mem.facts_version)]
        for node in mem.known_members():
            m = mem.member(node)
            if m is not None:
                rows.append((node, m.status.value, m.addr, m.incarnation, (mem.facts(node) or (0,))[0]))
        return tuple(rows)

    def members(self) -> list[MemberView]:
        mem = self.core.mem
        own_status = mem.status(self.node_id)
        rows = [
            MemberView(
                self.node_id,
                self.advertise,
                own_status.value if own_status else "alive",
                mem.incarnation,
                dict(self.core.user_facts),
                mem.facts_version,
            )
        ]
        for node in mem.known_members():
            m = mem.member(node)
            if m is None:
                continue
            version, facts = mem.facts(node) or (0, {})
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
        now = time.monotonic()
        self.core.start(now)
        self._drain()
        self._task = asyncio.create_task(self._run(), name=f"cluster-{self.node_id}")

    async def stop(self, leave: bool = True) -> None:
        """Leave gracefully (peers mark this node *left* at once), then stop sending and close."""
        if self._task is not None and leave and self.failed is None and not self._task.done():
            self.core.leave(time.monotonic())
            try:
                self._drain()
            except ClusterStateError as exc:
                self._fail(exc)
            await asyncio.sleep(min(1.0, 3 * self.core.mem.cfg.gossip_interval))
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
        """Add join seeds ("host:port", the operator's ``--join``; one string is one address); their members
        answer with the cluster. Silent seeds are retried, and new nodes wait for them before founding a
        cluster (:mod:`~aivailable.gossip.node_core`). Safe to call again with known ones."""
        addrs = [addrs] if isinstance(addrs, str) else addrs
        self.core.join([_check_addr(a) for a in addrs], time.monotonic())
        if self.running:
            self._drain()

    def discovered(self, addr: str) -> None:
        """An mDNS record of this cluster names ``addr`` (discovery's ``on_peer``). Unverified: it counts
        only once a member answers from there with a signed message, never blocks founding a cluster, and
        is forgotten after a few pushes without one."""
        try:
            addr = _check_addr(addr)
        except ConfigError:
            log.info("mDNS: ignoring a record with a bad address %r", addr)
            return
        self.core.discovered(addr, time.monotonic())
        if self.running:
            self._drain()

    def set_facts(self, facts: dict[str, Any]) -> None:
        """This node's facts (JSON-able; key ``_cluster`` is reserved), disseminated by membership."""
        json.dumps(facts)  # raises TypeError now rather than in every peer's decoder
        self.core.set_facts(facts, time.monotonic())

    def publish_placement(self, assignments: dict[str, Any]) -> tuple[int, int]:
        """Leader only: stamp, apply locally, deliver to every live member until acknowledged."""
        json.dumps(assignments)
        if not self.core.is_leader:
            raise NotLeaderError(self.core.leader)
        stamp = self.core.publish_placement(assignments, time.monotonic())
        if stamp is None:  # a newer term was seen: we are deposed
            raise NotLeaderError(None)
        try:
            self._drain()  # persisted before anyone is told
        except ClusterStateError as exc:
            self._fail(exc)
            raise
        return stamp

    # ---- the loop ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.cfg.tick_interval
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                self.core.tick(now)
                self._drain()
            except ClusterStateError as exc:
                self._fail(exc)
                return
            except Exception:
                if now - self._error_logged >= self.cfg.reject_log_interval:
                    self._error_logged = now
                    log.exception("cluster tick failed (continuing)")
            next_at = max(next_at + interval, now)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _drain(self) -> None:
        """Persist, send, handle events, advance, until the core has nothing ready."""
        changed = False
        applied: list[tuple[int, int, dict[str, Any]]] = []
        while self.core.has_ready():
            rd = self.core.ready()
            if rd.hard_state is not None:
                self._store.save_hard_state(rd.hard_state)  # before any message of this Ready leaves
            if rd.placements:
                self._store.save_placement(*rd.placements[-1])
            self.core.advance()
            for out in rd.messages:
                self._send(out)
            for ev in rd.events:
                if isinstance(ev, Note):
                    self._note(ev.text)
                    if ev.log_level is not None:
                        log.log(ev.log_level, "%s", ev.log or ev.text)
            applied.extend(rd.placements)
            changed = changed or rd.changed
        if self.on_placement is not None:
            for p in applied:
                self._call(self.on_placement, *p)
        if changed and self.on_change is not None:
            self._call(self.on_change)

    # ---- sending ---------------------------------------------------------------------------------------

    def _send(self, out: Outbound) -> None:
        if out.addr is None:
            self._send_failed.labels(why="no_address").inc()
            return
        if not self._post(out) and out.ack is not None:
            self.core.delivered(out.ack, False, time.monotonic())

    def _post(self, out: Outbound) -> bool:
        assert out.addr is not None
        if self._session is None or self._closing:
            return False
        if self._inflight.get(out.addr, 0) >= self.cfg.max_inflight_per_peer:
            self._send_failed.labels(why="backlog").inc()
            return False
        data = envelope.seal(out.msg, self._secret, self.node_id, time.time(), os.urandom(12))
        task = asyncio.create_task(self._deliver(out.addr, data, out.ack, out.to or None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _deliver(self, addr: str, data: bytes, ack: Any, to: str | None = None) -> None:
        assert self._session is not None
        self._inflight[addr] = self._inflight.get(addr, 0) + 1
        ok = False
        try:
            async with self._session.post(self.dialer.url(addr, GOSSIP_PATH), data=data,
                                          **self.dialer.options(to)) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    self._send_failed.labels(why=f"http_{resp.status}").inc()
        except aiohttp.ClientConnectorCertificateError as exc:
            self._send_failed.labels(why="tls_refused").inc()
            self._peer_refused(addr, to, exc)
        except (aiohttp.ClientError, TimeoutError, OSError):
            self._send_failed.labels(why="unreachable").inc()
        finally:
            left = self._inflight[addr] - 1
            if left:
                self._inflight[addr] = left
            else:
                del self._inflight[addr]
            if ack is not None and not self._closing:
                try:
                    self.core.delivered(ack, ok, time.monotonic())
                    self._drain()
                except ClusterStateError as exc:
                    self._fail(exc)

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
            if isinstance(msg, (*MEMBERSHIP_TYPES, *ELECTION_TYPES, PlacementPublish)):
                self.core.step(src, msg, now)
            self._drain()
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

    def note_rejection(self, peer: str, reason: str, detail: str) -> None:
        """Count a refused inter-node message or connection, and log it (once a minute per address)."""
        self.count_rejection(reason)
        now = time.monotonic()
        last = self._reject_logged.get(peer)
        if last is None or now - last >= self.cfg.reject_log_interval:
            if len(self._reject_logged) > 4096:
                horizon = now - self.cfg.reject_log_interval
                self._reject_logged = {p: t for p, t in self._reject_logged.items() if t > horizon}
            self._reject_logged[peer] = now
            log.warning(
                "dropped a cluster message or connection from/to %s: %s (%s); drops are counted in "
                "aivailable_cluster_rejected_total and logged once a minute per address",
                peer,
                reason,
                detail,
            )

    def _peer_refused(self, addr: str, to: str | None, exc: BaseException) -> None:
        why = str(getattr(exc, "certificate_error", exc))
        hint = (f"it is not the node {to!r} (a new node at an old address?)" if "Hostname mismatch" in why
                else tls.clock_hint(why) or "its certificate is not from this cluster's CA: a different cluster secret?")
        self.note_rejection(addr, "tls_peer_refused", f"{why}; {hint}")

    def _reject(self, peer: str, reason: str, detail: str) -> web.Response:
        self.note_rejection(peer, reason, detail)
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



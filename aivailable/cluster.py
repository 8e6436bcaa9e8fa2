"""The node's cluster side: gossip transport, discovery, the coordinator loop and remote replicas.

Every node runs this. The elected leader folds all live nodes' facts into a placement
(`coordinator.decide`) and publishes it stamped (term, version); every node applies accepted
placements (the transport's fence drops stale ones) by reconciling its engine to its share.
Losing the leader, or a partition, never unloads anything: nodes only act on placements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from aivailable import coordinator as coord
from aivailable.api.router import Upstream
from aivailable.autonomy import AutonomyConfig
from aivailable.autonomy_loop import AutonomyLoop
from aivailable.clusterview import MemberInfo, build_view
from aivailable.coordinator import NodeFacts
from aivailable.gossip import envelope, tls
from aivailable.gossip.election import ElectionConfig
from aivailable.gossip.membership_types import MembershipConfig
from aivailable.gossip.peerhttp import PeerDialer
from aivailable.gossip.secret import load_or_create_secret
from aivailable.gossip.state_store import ClusterStateError
from aivailable.gossip.transport import ClusterTransport
from aivailable.gossip.transport_types import TransportConfig
from aivailable.keysync import Peer as KeyPeer

if TYPE_CHECKING:
    from aivailable.node import Node

log = logging.getLogger("aivailable.cluster")

FACTS_INTERVAL_S = 0.25
"""How often own facts are compared with what was last gossiped (sent only when they changed)."""
COORDINATOR_INTERVAL_S = 1.0
"""Longest wait between coordinator rounds; a membership or facts change wakes it at once."""
LEADER_SETTLE_S = 1.5
"""A new leader waits this long for facts before its first placement, so it does not move models
of nodes it has not heard from yet."""


class RateMeter:
    """Requests/s per model over a sliding window (exponentially decayed)."""

    def __init__(self, half_life_s: float = 30.0):
        self.half_life_s = half_life_s
        self._rate: dict[str, float] = defaultdict(float)
        self._at: dict[str, float] = {}

    def _decay(self, model: str, now: float) -> None:
        last = self._at.get(model, now)
        self._rate[model] *= 0.5 ** ((now - last) / self.half_life_s)
        self._at[model] = now

    def hit(self, model: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._decay(model, now)
        self._rate[model] += 0.693 / self.half_life_s  # integral of one hit's decayed contribution = 1

    def rates(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        for m in list(self._rate):
            self._decay(m, now)
        return {m: round(r, 3) for m, r in self._rate.items() if r >= 0.001}


_VOLATILE = {"outstanding", "queued", "requests", "cancelled", "completion_tokens", "tokens_per_s", "uptime_s",
             "prompt_tokens", "cached_tokens"}


def _shape(facts: dict) -> dict:
    """Facts without the counters that change with every request or transferred chunk (those go out at
    most once a second)."""
    out = {k: v for k, v in facts.items() if k not in ("rates", "transfers", "usage", "key_load")}
    out["transfers"] = [(t["model"], t["state"]) for t in facts.get("transfers", [])]
    out["replicas"] = [{k: v for k, v in r.items() if k not in _VOLATILE} for r in facts.get("replicas", [])]
    return out


def _profiles(profile: str) -> tuple[MembershipConfig, ElectionConfig, TransportConfig]:
    if profile == "local":
        return MembershipConfig.local(), ElectionConfig.local(), TransportConfig.local()
    return MembershipConfig.lan(), ElectionConfig.lan(), TransportConfig.lan()


def _cert_names(advertise: str | None, bind_host: str) -> list[str]:
    """Host names and addresses this node's cluster certificate names (besides its node id)."""
    from aivailable.gossip.discovery import advertise_host

    names = [advertise or advertise_host(bind_host), "localhost", "127.0.0.1"]
    if bind_host not in ("0.0.0.0", "::", ""):
        names.append(bind_host)
    return names


class Cluster:
    """Gossip, election and coordination for one node."""

    def __init__(self, node: Node):
        self.node = node
        cfg = node.settings.node
        secret, created = load_or_create_secret(node.state_dir, cfg.cluster_secret, cfg.cluster_secret_file)
        self.secret = secret if isinstance(secret, bytes) else secret.encode()
        self.secret_created = created
        self.cluster_hash = envelope.cluster_id_hash(self.secret)
        self.tls = None if cfg.insecure_cluster else tls.node_tls(
            self.secret, node.node_id, node.state_dir / "tls", names=_cert_names(cfg.advertise_host, cfg.host))
        """This node's certificate for cluster traffic (None: --insecure-cluster, plain HTTP between nodes)."""
        self.dialer = PeerDialer(self.tls)
        """How this node reaches peers (gossip, forwarded requests, model files)."""
        self.transport: ClusterTransport | None = None
        self.discovery = None
        self.rates = RateMeter()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._upstreams: dict[str, Upstream] = {}
        self._stamp: tuple | None = None
        """`transport.facts_stamp()` that the cached views below were derived from."""
        self._catalog_cache: dict[str, dict] | None = None
        self._remote_cache: dict[str, list[Upstream]] = {}
        self._leader_since: float | None = None
        self._last_facts: dict | None = None
        self._last_nodes: set[str] = set()
        self._last_drains: list[str] = []
        self._wake = asyncio.Event()
        self.unplaced: dict[str, str] = {}
        self._conflicts: dict[str, str] = {}
        self.autonomy: AutonomyLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """POST /_cluster/gossip, delegated to the transport once it runs."""
        if self.transport is None:
            return web.Response(status=503, text="node starting")
        return await self._gossip_handler(request)

    async def start(self, advertise: str) -> None:
        node = self.node
        cfg = node.settings.node
        mem, ele, tra = _profiles(cfg.profile)
        self.transport = ClusterTransport(node.node_id, advertise, self.secret, node.state_dir, membership=mem,
                                          election=ele, config=tra, registry=node.metrics.registry,
                                          on_placement=self._on_placement, on_change=self._on_change,
                                          dialer=self.dialer)
        self._gossip_handler = self.transport.routes()[0].handler
        if self.secret_created:
            from aivailable.jointoken import startup_message

            log.warning("%s", startup_message(advertise, self.secret, node.state_dir))
        prior = self.transport.placement()
        if prior is not None:  # restart: resume our share of the last placement we accepted
            await self._on_placement(*prior)
        await self.transport.start()
        if cfg.join:
            self.transport.join(list(cfg.join))
        if cfg.mdns:
            from aivailable.gossip.discovery import Discovery

            host, port = advertise.rsplit(":", 1)
            self.discovery = Discovery(node.node_id, cfg.host if cfg.host not in ("0.0.0.0", "::") else host,
                                       int(port), self.cluster_hash, None, self.transport.discovered)
            try:
                await self.discovery.start()
            except OSError as exc:
                log.warning("mDNS discovery unavailable (%s); use --join HOST:PORT to find peers", exc)
                self.discovery = None
        # Requests proxied to peers. No connection cap (aiohttp's default of 100 would queue the 101st
        # concurrent stream inside this node, unseen; the holder's own queue answers 429 instead) and no
        # cookie jar (a proxy must not carry one client's upstream cookies into another's request).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=3))
        self._tasks += [asyncio.create_task(self._facts_loop(), name="facts"),
                        asyncio.create_task(self._coordinator_loop(), name="coordinator")]
        self.autonomy = AutonomyLoop(self, AutonomyConfig(grace_s=cfg.autonomous_grace_s))
        self._tasks.append(asyncio.create_task(self.autonomy.run(), name="autonomy"))

    async def stop(self) -> None:
        await self.leave()
        await self.close()

    async def leave(self) -> None:
        """Stop gossip and coordination; peers mark this node *left* at once. Proxied requests in
        flight keep their connections until `close`."""
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        if self.transport is not None and self.transport.running:
            await self.transport.stop()

    async def close(self) -> None:
        """Close the connections to peers (after the node's requests have drained)."""
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        """Run a coordinator round now (if this node leads) and gossip changed facts."""
        self._wake.set()

    # -- facts and placement -------------------------------------------------------------------
    def own_facts(self) -> NodeFacts:
        f = self.node.facts()
        return NodeFacts(**{**f.__dict__, "rates": self.rates.rates()})

    async def _facts_loop(self) -> None:
        """Gossip own facts when they change: at once for replicas/GPUs, at most once a second for rates."""
        last_sent = 0.0
        while True:
            facts = self.own_facts().to_dict()
            now = time.monotonic()
            last = self._last_facts or {}
            structural = _shape(facts) != _shape(last)
            if structural or (facts != last and now - last_sent >= 1.0):
                self.transport.set_facts(facts)
                self._last_facts, last_sent = facts, now
            await asyncio.sleep(FACTS_INTERVAL_S)

    def member_infos(self) -> list[MemberInfo]:
        """Every known member with its facts; this node's facts are always the freshest."""
        out = []
        for m in self.transport.members():
            if m.node_id == self.node.node_id:
                facts: NodeFacts | None = self.own_facts()
            else:
                facts = NodeFacts.from_dict(m.facts) if m.facts.get("node_id") else None
            out.append(MemberInfo(m.node_id, m.address, m.status, facts))
        return out

    def _on_change(self) -> None:
        self._wake.set()  # membership, facts or leader changed: the coordinator looks at once

    async def _coordinator_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), COORDINATOR_INTERVAL_S)
            self._wake.clear()
            try:
                self._log_conflicts()
                self._coordinate()
            except ClusterStateError:
                pass  # the transport stopped and logged why; this node coordinates no more
            except Exception:  # never let one bad round kill the coordinator
                log.exception("coordinator round failed")

    def _log_conflicts(self) -> None:
        """Say once in the log when two nodes define a model differently (and when that is resolved)."""
        facts = [m.facts for m in self.member_infos() if m.facts is not None and m.state in ("alive", "suspect")]
        _, conflicts = coord.merged_catalog(facts)
        for name, why in sorted(conflicts.items()):
            if self._conflicts.get(name) != why:
                log.warning("model %s is %s (fix the config files so they agree; files/catalog.py has the rule)",
                            name, why)
        for name in sorted(set(self._conflicts) - set(conflicts)):
            log.info("model %s: definitions agree again", name)
        self._conflicts = conflicts

    def _coordinate(self) -> None:
        t = self.transport
        if not t.is_leader or t.failed is not None:  # failed: its state cannot be persisted (logged once)
            self._leader_since = None
            return
        now = time.monotonic()
        if self._leader_since is None:
            self._leader_since = now
            self._last_nodes = {r["node"] for reps in self.node.placement.values() for r in reps}
            log.info("this node is the coordinator (term %d)", t.term)
            loop = asyncio.get_running_loop()
            loop.call_later(LEADER_SETTLE_S, self._wake.set)
        if now - self._leader_since < LEADER_SETTLE_S:
            return
        infos = [m for m in self.member_infos() if m.state in ("alive", "suspect")]
        if any(m.facts is None for m in infos):
            return  # a live member's facts have not arrived yet: do not move its models
        facts = [m.facts for m in infos if m.facts is not None]
        current = self.node.placement
        new, reasons = coord.decide(facts, current, now=time.time(),
                                    keep_alive_default=self.node.settings.node.keep_alive)
        self.unplaced = reasons
        nodes = {f.node_id for f in facts}
        joined, gone = sorted(nodes - self._last_nodes), sorted(self._last_nodes - nodes)
        self._last_nodes = nodes
        leaving = sorted(f.node_id for f in facts if f.leaving)
        drains = sorted(f.node_id + ("" if f.drained else ":" + "+".join(f.drained_gpus))
                        for f in facts if f.drained or f.drained_gpus)
        drains_changed, self._last_drains = drains != self._last_drains, drains
        if new != current:
            if not current:
                cause = "first placement"
            elif leaving:
                cause = f"node {', '.join(leaving)} leaving (graceful shutdown)"
            elif drains_changed:
                cause = f"drain of {', '.join(drains)}" if drains else "undrain"
            elif gone:
                cause = f"node {', '.join(gone)} gone"
            elif joined:
                cause = f"node {', '.join(joined)} joined"
            elif idle := sorted(m for m in current if m not in new and reasons.get(m, "").startswith("idle")):
                cause = f"{', '.join(idle)} idle past keep_alive"
            else:
                cause = "demand or VRAM changed"
            term, version = t.publish_placement(new)
            self.node.record_event(f"coordinator published placement v{version} of term {term}: {cause}")

    async def _on_placement(self, term: int, version: int, assignments: dict[str, Any]) -> None:
        log.info("applying placement v%d of term %d (%d models)", version, term, len(assignments))
        self.node.apply_placement(term, version, assignments)
        if self.autonomy is not None:  # a placement that needs an autonomous replica's VRAM wins, before loading
            await self.autonomy.round(time.monotonic())
        await self.node.reconcile()  # a leaving node keeps its workers until drained

    # -- routing -------------------------------------------------------------------------------
    def _fresh(self) -> None:
        """Drop the cached catalog and upstream lists when any member or its facts changed."""
        stamp = self.transport.facts_stamp()
        if stamp != self._stamp:
            self._stamp, self._catalog_cache, self._remote_cache = stamp, None, {}

    def remote_upstreams(self, model: str) -> list[Upstream]:
        """Ready replicas of `model` on other live nodes (rebuilt only when membership or facts change)."""
        if self.transport is None:
            return []
        self._fresh()
        ups = self._remote_cache.get(model)
        if ups is None:
            ups = self._remote_cache[model] = self._remote_upstreams(model)
        return list(ups)

    def _remote_upstreams(self, model: str) -> list[Upstream]:
        out: list[Upstream] = []
        for m in self.transport.members():
            if m.node_id == self.node.node_id or m.status != "alive":
                continue
            for r in m.facts.get("replicas", []):
                if r.get("model") != model or r.get("state") != "ready":
                    continue
                key = f"{m.node_id}/{model}@{'+'.join(r['gpus'])}"
                up = self._upstreams.get(key)
                base_url = self.dialer.base_url(m.address)
                if up is None or up.base_url != base_url:
                    up = Upstream(key=key, model=model, session_fn=lambda: self._session,
                                  base_url=base_url, local=False, node_id=m.node_id,
                                  slots=int(r.get("slots", 1)), request_kw=self.dialer.options(m.node_id))
                    self._upstreams[key] = up
                # What the holder reported (its own clients and other nodes'), about a second old.
                up.reported_load = int(r.get("outstanding", 0)) + int(r.get("queued", 0))
                up.draining = bool(m.facts.get("leaving")) or bool(r.get("drained"))
                up.alive_fn = lambda nid=m.node_id: self._alive(nid)
                out.append(up)
        return out

    @property
    def peer_session(self) -> aiohttp.ClientSession | None:
        """The pooled session for requests to peers (proxied API requests, key-set sync)."""
        return self._session

    def key_peers(self) -> list[KeyPeer]:
        """Every other alive node with its gossiped key-set digest and rate-limited key counts."""
        if self.transport is None:
            return []
        return [KeyPeer(m.node_id, m.address, m.facts.get("keys"), dict(m.facts.get("key_load") or {}))
                for m in self.transport.members() if m.node_id != self.node.node_id and m.status == "alive"]

    def holders_of(self, sha256: str) -> dict[str, str]:
        """{node id: address} of the other live nodes that hold the file `sha256`."""
        if self.transport is None:
            return {}
        return {m.node_id: m.address for m in self.transport.members()
                if m.node_id != self.node.node_id and m.status == "alive" and sha256 in (m.facts.get("files") or {})}
    def _alive(self, node_id: str) -> bool:
        """False once membership declares `node_id` dead. A suspect may just be slow, and a node that left
        gracefully still finishes what it was given (it drains): requests waiting on those are kept.
        True when this node cannot tell (gossip stopped while leaving)."""
        t = self.transport
        if t is None or not t.running:
            return True
        status = t.mem.status(node_id)
        return status is None or status.value != "dead"

    def catalog(self) -> dict[str, dict]:
        """Every model any live node defines (name -> definition); recomputed only when membership or facts
        change. The dict is shared: read it, never change it."""
        self._fresh()
        if self._catalog_cache is None:
            facts = [m.facts for m in self.member_infos() if m.facts is not None and m.state in ("alive", "suspect")]
            self._catalog_cache, _conflicts = coord.merged_catalog(facts)
        return self._catalog_cache

    def view(self) -> dict:
        t = self.transport
        events = [{"time": ts, "text": text} for ts, text in t.events] + self.node.events
        events.sort(key=lambda e: e["time"])
        placed = t.placement()
        return build_view(self_id=self.node.node_id, leader=t.leader, term=t.term,
                          version=placed[1] if placed else 0, backend=self.node.backend.summary(),
                          members=self.member_infos(), placement=self.node.placement,
                          unplaced={**self.node.unplaced, **self.unplaced}, events=events,
                          keep_alive_default=self.node.settings.node.keep_alive, now=time.time())

"""Replicating the API key set between nodes: persistence, `POST /_cluster/keys`, push and pull.

The set itself is a CRDT (aivailable/apikeys/keyset.py), so replication only has to bring every node
every record eventually, in any order:

* **Push.** An admin change (api/admin.py) is saved, then sent at once to every alive peer; each answers
  with its merged set. Convergence is then one round trip (a few milliseconds on a LAN).
* **Pull.** Every node gossips its set's digest in its facts (``keys``). Every ``SYNC_INTERVAL_S`` a node
  compares its digest with each alive peer's and exchanges sets with a peer whose digest differs (at most
  one exchange per peer in flight, retried after ``RETRY_S``). A node that was down, partitioned, or missed
  a push thus converges within gossip propagation time plus one round trip.

Both directions use one signed message (`gossip.messages.KeySetSync`) answered by the same type, each in
a signed envelope (the answer is verified too: it changes who may use the cluster). Peer calls go through
`PeerDialer.post` (gossip/peerhttp.py: TLS to the cluster port) over the cluster's peer session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from aivailable.apikeys import store
from aivailable.apikeys.keyset import KeySet, RecordError
from aivailable.apikeys.ring import KeyRing
from aivailable.gossip import envelope
from aivailable.gossip.messages import KeySetSync
from aivailable.gossip.peerhttp import PeerDialer
from aivailable.gossip.signed import Refused, open_signed

log = logging.getLogger("aivailable.keys")

KEYS_PATH = "/_cluster/keys"
SYNC_INTERVAL_S = 0.25
RETRY_S = 2.0
"""Least time between two pulls from one peer (its gossiped digest may lag behind a finished exchange)."""
PUSH_TIMEOUT_S = 2.0
"""How long an admin change waits for each peer's answer before it leaves the rest to gossip."""
MAX_BYTES = 16 * 1024 * 1024
"""One key-set exchange (the whole set, tombstones included: ~300 bytes a record). Not envelope.MAX_BYTES
(256 KiB, ~870 records): past that every push and pull would fail and revokes stop replicating."""
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Peer:
    """An alive other node as gossip last told: its address, key-set digest (None: an older node that
    gossips none) and its 60-s counts of rate-limited keys."""

    node_id: str
    address: str
    digest: str | None
    load: dict[str, int]


class KeySync:
    """The node's key ring with its disk and its peers."""

    def __init__(self, *, node_id: str, secret: bytes, state_dir: Path,
                 session: Callable[[], aiohttp.ClientSession | None], peers: Callable[[], list[Peer]],
                 on_rejected: Callable[[str], None] = lambda reason: None, dialer: PeerDialer | None = None):
        self.node_id, self.secret = node_id, secret
        self.dialer = dialer or PeerDialer()
        self.path = state_dir / store.KEYS_FILE
        self.ring = KeyRing(node_id, store.load(self.path))
        self._session, self._peers, self._on_rejected = session, peers, on_rejected
        self._replay = envelope.ReplayCache()
        self._answers = envelope.ReplayCache()
        self._inflight: set[str] = set()
        """Peers with a gossip-driven pull in flight (at most one each; pushes always go)."""
        self._tried: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- local changes ---------------------------------------------------------------------------------
    def save(self) -> None:
        store.save(self.path, self.ring.keyset)

    async def changed(self) -> list[str]:
        """After an admin change: save, then exchange sets with every alive peer at once."""
        self.save()
        peers = self._peers()
        results = await asyncio.gather(*(self._exchange(p, timeout_s=PUSH_TIMEOUT_S) for p in peers),
                                       return_exceptions=True)
        failed = [p.node_id for p, r in zip(peers, results, strict=True) if r is not True]
        if failed:
            log.warning("key set change not pushed to %s yet; they get it by gossip", ", ".join(failed))
        return failed

    # -- gossip-driven pull ----------------------------------------------------------------------------
    def refresh(self) -> list[Peer]:
        """Feed the ring the peers' latest digests and counts; the peers whose digest differs from ours."""
        peers = self._peers()
        self.ring.set_peers({p.node_id: (p.digest, p.load) for p in peers})
        return [p for p in peers if p.digest is not None and p.digest != self.ring.digest]

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for p in self.refresh():
                if p.node_id not in self._inflight and now - self._tried.get(p.node_id, -RETRY_S) >= RETRY_S:
                    self._tried[p.node_id] = now
                    task = asyncio.create_task(self._pull(p), name=f"key sync {p.node_id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def _pull(self, peer: Peer) -> None:
        self._inflight.add(peer.node_id)
        try:
            await self._exchange(peer)
        finally:
            self._inflight.discard(peer.node_id)

    async def _exchange(self, peer: Peer, timeout_s: float = 5.0) -> bool:
        """Send our set to `peer` and merge its answer; True when the exchange worked."""
        session = self._session()
        if session is None or session.closed:
            return False
        try:
            data = envelope.seal(KeySetSync(records=self.ring.keyset.to_list()), self.secret, self.node_id,
                                 time.time(), os.urandom(12))
            status, body = await self.dialer.post(session, peer.address, peer.node_id, KEYS_PATH, data,
                                                  timeout_s=timeout_s, max_bytes=MAX_BYTES)
            if status != 200:
                log.warning("key set exchange with %s: HTTP %d %s", peer.node_id, status, body[:200])
                return False
            src, msg = envelope.open(body, self.secret, time.time(), self._answers, max_bytes=MAX_BYTES)
            if src != peer.node_id or not isinstance(msg, KeySetSync):
                log.warning("key set exchange with %s: answer from %r (%s) refused", peer.node_id, src,
                            type(msg).__name__)
                return False
            self._merge(KeySet.from_list(msg.records), peer.node_id)
            return True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("key set exchange with %s failed: %s", peer.node_id, exc)
            return False
        except (envelope.EnvelopeError, RecordError) as exc:
            log.warning("key set exchange with %s: bad answer: %s", peer.node_id, exc)
            return False

    def _merge(self, incoming: KeySet, src: str) -> None:
        before = self.ring.digest
        if self.ring.merge(incoming):
            self.save()
            log.info("API key set %s -> %s (merged from %s; %d active)", before, self.ring.digest, src,
                     len(self.ring.keyset.active(time.time())))

    # -- the peer's side ---------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """POST /_cluster/keys: merge the sender's set, answer with ours (both signed)."""
        try:
            src, msg = await open_signed(request, self.secret, self._replay, own_id=self.node_id,
                                         max_bytes=MAX_BYTES, timeout_s=READ_TIMEOUT_S)
        except Refused as r:
            self._on_rejected(r.reason)
            status = envelope.REJECT_STATUS.get(r.reason, 400)
            return r.answer(request, web.Response(status=status, text=r.reason))
        if not isinstance(msg, KeySetSync):
            self._on_rejected("malformed")
            return web.Response(status=400, text=f"a {type(msg).__name__} is not a key set")
        try:
            incoming = KeySet.from_list(msg.records)
        except RecordError as exc:
            self._on_rejected("malformed")
            return web.Response(status=400, text=str(exc))
        self._merge(incoming, src)
        answer = envelope.seal(KeySetSync(records=self.ring.keyset.to_list()), self.secret, self.node_id,
                               time.time(), os.urandom(12))
        return web.Response(body=answer, content_type="application/octet-stream")

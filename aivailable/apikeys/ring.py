"""`KeyRing`: one node's key set with what the API asks of it (sans-IO; every time is an argument).

It holds the merged :class:`~aivailable.apikeys.keyset.KeySet` (with an index by key id and its digest,
rebuilt only when the set changes), this node's admitted-request counts per rate-limited key, and the
latest digests and counts the other alive nodes gossiped. The node's I/O side (aivailable/keysync.py)
persists the set, pushes it to peers and feeds `set_peers`; the API (api/app.py, api/admin.py) calls
`verify`, `admit` and the admin changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aivailable.apikeys import keyset as ks
from aivailable.apikeys import quota

_EMPTY = ks.digest(ks.KeySet())


class KeyRing:
    def __init__(self, node_id: str, initial: ks.KeySet | None = None):
        self.node_id = node_id
        self.counts = quota.WindowCounts()
        self.last_used: dict[str, float] = {}
        """Key name -> epoch seconds of its last request admitted by this node."""
        self.peer_digests: dict[str, str | None] = {}
        self.peer_load: dict[str, Mapping[str, int]] = {}
        self._set = ks.KeySet()
        self._index: dict[str, ks.Record] = {}
        self._digest = ks.digest(self._set)
        self._install(initial or ks.KeySet())

    # -- the set ---------------------------------------------------------------------------------------
    @property
    def keyset(self) -> ks.KeySet:
        return self._set

    @property
    def digest(self) -> str:
        return self._digest

    def _install(self, new: ks.KeySet) -> bool:
        d = ks.digest(new)
        if d == self._digest and new.records.keys() == self._set.records.keys():
            return False
        self._set, self._index, self._digest = new, new.by_key_id(), d
        return True

    def merge(self, incoming: ks.KeySet | Iterable[ks.Record]) -> bool:
        """Join a peer's set into ours; True when ours changed."""
        return self._install(ks.merge(self._set, incoming))

    def add(self, *, now: float, **fields) -> str:
        """Add a key (fields as `keyset.add`); its text, shown once. ChangeError for a refused change."""
        new, text = ks.add(self._set, now=now, node_id=self.node_id, **fields)
        self._install(new)
        return text

    def revoke(self, name: str, *, now: float) -> None:
        self._install(ks.revoke(self._set, name, now=now, node_id=self.node_id))

    # -- requests --------------------------------------------------------------------------------------
    def protecting(self) -> bool:
        """Our set protects, or an alive peer holds a (non-empty) set we have not merged yet: a node that
        joined or lost api_keys.json must not serve /v1 openly (and forward it unchecked) until it has."""
        return self._set.protecting() or any(d not in (None, _EMPTY, self._digest)
                                             for d in self.peer_digests.values())

    def restore(self, previous: ks.KeySet) -> None:
        """Undo an admin change whose save failed (nothing was pushed: the save comes first)."""
        self._install(previous)

    def verify(self, text: str, now: float) -> tuple[ks.Verdict, ks.Record | None]:
        return ks.verify(self._set, text, now, self._index)

    def admit(self, rec: ks.Record, mono_now: float, wall_now: float) -> float:
        """0.0 when a request of `rec`'s key may go now (and is counted here), else seconds to wait."""
        if rec.rpm > 0:
            own = self.counts.count(rec.name, mono_now)
            others = (load.get(rec.name, 0) for load in self.peer_load.values())
            if not quota.admit(own, others, rec.rpm):
                return self.counts.retry_after(rec.name, mono_now)
            self.counts.note(rec.name, mono_now)
        self.last_used[rec.name] = wall_now
        return 0.0

    # -- gossip ----------------------------------------------------------------------------------------
    def set_peers(self, peers: Mapping[str, tuple[str | None, Mapping[str, int]]]) -> None:
        """The alive other nodes' latest (digest, key_load) as gossiped; nodes not named are gone."""
        self.peer_digests = {n: d for n, (d, _load) in peers.items()}
        self.peer_load = {n: dict(load) for n, (_d, load) in peers.items()}

    def facts(self, mono_now: float) -> dict:
        """This node's gossiped fields: the set's digest and its 60-s counts of rate-limited keys."""
        limited = {r.name for r in self._set.records.values() if r.rpm > 0 and not r.revoked}
        return {"keys": self._digest,
                "key_load": {k: n for k, n in self.counts.counts(mono_now).items() if k in limited}}

    def view(self, now: float) -> dict:
        """/api/cluster's `keys`: active count, digest, and whether every alive node has this digest."""
        return {"active": len(self._set.active(now)), "digest": self._digest,
                "converged": all(d == self._digest for d in self.peer_digests.values()),
                "nodes": {self.node_id: self._digest, **self.peer_digests}}

    def listing(self, now: float) -> list[dict]:
        """`GET /admin/keys`: every key (revoked ones too) without secrets, with this node's last use."""
        out = []
        for r in sorted(self._set.records.values(), key=lambda r: r.name):
            v = r.view()
            v["state"] = "revoked" if r.revoked else "expired" if r.expired(now) else "active"
            v["last_used"] = {self.node_id: self.last_used[r.name]} if r.name in self.last_used else {}
            out.append(v)
        return out

"""The node's durable cluster state: election HardState and the accepted placement, in a diskcache.

A state directory that cannot be read refuses to start (:class:`ClusterStateError`); one that cannot be
written stops the transport: a node must never forget a vote it gave.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diskcache

from aivailable.errors import NodeError
from aivailable.gossip.election import HardState
from aivailable.gossip.messages import VoterSet

__all__ = ["ClusterStateError", "StateStore"]


class ClusterStateError(NodeError):
    """The persisted cluster state cannot be read or written; the node must not run without it."""


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



"""Maintenance drains as pure rules: which GPUs take no placement, when a drained replica may stop, who may
ask for it.

A drain takes a whole node or some of its GPUs out of placement without dropping a request. The node keeps
it in ``STATE_DIR/drain.json`` (so it survives a restart) and gossips it in its facts (``drained``,
``drained_gpus``); the coordinator gives those GPUs nothing (`excluded_devices`). The node keeps serving its
replicas there until the model is ready on a GPU that is not drained (make before break: `handed_over`),
then stops them once their requests in flight have finished (aivailable/drain.py drives this).

Only the admin key may drain: HMAC-SHA256 of the cluster secret with ``ADMIN_CONTEXT`` (`admin_key`), the
same on every node of a cluster, never equal to an API key, and derivable on any node that holds the
secret (``aivailable admin-key``). No I/O here except `load`/`save` of the drain file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aivailable.errors import AuthenticationError, Forbidden, InvalidRequest
from aivailable.statedir import StateDirError, explain, read_state_file

if TYPE_CHECKING:
    from aivailable.coordinator import NodeFacts

DRAIN_FILE = "drain.json"
ADMIN_CONTEXT = b"aivailable admin key v1"
"""HMAC message that derives the admin key from the cluster secret (another context, another key)."""
ADMIN_PREFIX = "aiv-admin-"


@dataclass(frozen=True)
class Drain:
    """What of this node is drained: the whole node, or some of its GPUs (local device ids)."""

    node: bool = False
    gpus: frozenset[str] = field(default_factory=frozenset)

    @property
    def active(self) -> bool:
        return self.node or bool(self.gpus)

    def covers(self, device_ids: Iterable[str]) -> bool:
        """True when a replica on `device_ids` runs on drained hardware (any one of its GPUs)."""
        return self.node or any(d in self.gpus for d in device_ids)

    def to_dict(self) -> dict:
        return {"node": self.node, "gpus": sorted(self.gpus)}


def parse(data: object) -> Drain:
    """A drain file's JSON; ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object {\"node\": bool, \"gpus\": [ids]}")
    node, gpus = data.get("node", False), data.get("gpus", [])
    if not isinstance(node, bool):
        raise ValueError("field 'node' must be true or false")
    if not isinstance(gpus, list) or not all(isinstance(g, str) and g for g in gpus):
        raise ValueError("field 'gpus' must be a list of GPU ids")
    return Drain(node=node, gpus=frozenset(gpus))


def load(path: Path) -> Drain:
    """The drain state kept at `path`; nothing drained when the file does not exist."""
    text = read_state_file(path, "the drain state")
    if text is None:
        return Drain()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateDirError(f"{path}: unreadable drain state (not JSON: {exc}); fix or delete it (deleting it "
                            "undrains this node)") from None
    try:
        return parse(data)
    except ValueError as exc:
        raise StateDirError(f"{path}: unreadable drain state ({exc}); fix or delete it (deleting it undrains "
                            "this node)") from None


def save(path: Path, drain: Drain) -> None:
    """Write `drain` whole or not at all; no file when nothing is drained."""
    try:
        if not drain.active:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(drain.to_dict(), f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise StateDirError(f"cannot write the drain state {explain(path, exc)}") from None


def change(drain: Drain, *, gpu: object, drained: bool, devices: Sequence[str]) -> Drain:
    """`drain` after a drain (`drained`) or undrain request for `gpu` (None: the whole node). Undraining the
    node clears every GPU drain too. InvalidRequest naming `gpu` for an id this node does not have."""
    if gpu is None:
        return Drain(node=True, gpus=drain.gpus) if drained else Drain()
    if not isinstance(gpu, str) or gpu not in devices:
        have = ", ".join(devices) or "none"
        raise InvalidRequest(f"gpu {gpu!r} is not a GPU of this node (its GPUs: {have})", param="gpu")
    gpus = drain.gpus | {gpu} if drained else drain.gpus - {gpu}
    return Drain(node=drain.node, gpus=frozenset(gpus))


def excluded_devices(facts: NodeFacts) -> set[str]:
    """Local device ids of a node that placement must not use: all of them when the node is drained."""
    if facts.drained:
        return {d["id"] for d in facts.devices}
    return set(facts.drained_gpus)


def handed_over(model: str, replicas: Iterable[dict]) -> bool:
    """True when `model` is ready somewhere a drain does not cover (`replicas`: {model, state, drained?,
    leaving?} rows of every live node's replicas, this node's included)."""
    return any(r.get("model") == model and r.get("state") == "ready" and not r.get("drained")
               and not r.get("leaving") for r in replicas)


def may_stop(*, handed_over_for_s: float | None, outstanding: int, settle_s: float, grace_s: float) -> bool:
    """A drained replica stops once its model has been ready elsewhere for `settle_s` (peers' routers know the
    new replica) and its requests in flight have finished, or `grace_s` after the hand-over anyway."""
    if handed_over_for_s is None or handed_over_for_s < settle_s:
        return False
    return outstanding == 0 or handed_over_for_s >= grace_s


def admin_key(secret: bytes) -> str:
    """The cluster's admin key (`ADMIN_PREFIX` + 64 hex digits)."""
    return ADMIN_PREFIX + hmac.new(secret, ADMIN_CONTEXT, hashlib.sha256).hexdigest()


def check_admin(authorization: str | None, key: str, api_keys: Iterable[str]) -> None:
    """Accept `Authorization: Bearer <admin key>` (constant-time compare). AuthenticationError (401) when
    missing or wrong, Forbidden (403) for an API key: those serve models, they do not run the cluster."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing admin key: send 'Authorization: Bearer <admin key>' (aivailable "
                                  "admin-key prints it on a node of the cluster).")
    if hmac.compare_digest(token.encode(), key.encode()):
        return
    if any(hmac.compare_digest(token.encode(), k.encode()) for k in api_keys):
        raise Forbidden("An API key cannot use the admin API (drains, keys); use the cluster's admin key.")
    raise AuthenticationError("Incorrect admin key provided.")

"""The driver of aivailable/autonomy.py: once a second, observe the cluster, decide, apply.

Applying means: new autonomous replicas join the node's assignments (Node.reconcile loads them like placed
ones, fetching the file from a reachable holder if it is not here); a retired one first stops taking new
requests (its upstream is draining, and its gossiped state is `retiring`, so peers stop routing to it), then
is unloaded once its requests in flight have finished (at most `DRAIN_S`); one whose VRAM a new placement
needs is unloaded at once (this round also runs when a placement arrives, before its replicas start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aivailable import autonomy
from aivailable import coordinator as coord

if TYPE_CHECKING:
    from aivailable.cluster import Cluster

log = logging.getLogger("aivailable.autonomy")

DEMANDED_RATE = 0.005
"""Requests/s (decayed, half-life 30 s) above which a model counts as asked for here: one request in about a
minute."""
DRAIN_S = 60.0
"""Longest wait for a retiring replica's requests in flight before it is unloaded anyway."""


class AutonomyLoop:
    """Runs a node's autonomous replicas: the only caller of the transitions of `node.autonomous`
    (aivailable/autonomy_state.py)."""

    def __init__(self, cluster: Cluster, config: autonomy.AutonomyConfig):
        self.cluster, self.node, self.config = cluster, cluster.node, config
        self.coordinator: str | None = None
        self.changed_at = time.monotonic()
        self._drains: set[asyncio.Task] = set()

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.round(time.monotonic())
            except Exception:  # never let one bad round stop serving
                log.exception("autonomy round failed")

    def _coordinator(self) -> str | None:
        """The coordinator this node follows, if it is reachable (alive in membership)."""
        t = self.cluster.transport
        if t is None or t.leader is None:
            return None
        if t.leader == self.node.node_id:
            return t.leader
        status = t.mem.status(t.leader)
        return t.leader if status is not None and status.value == "alive" else None

    def situation(self, now: float) -> autonomy.Situation:
        node, t = self.node, self.cluster.transport
        leader = self._coordinator()
        if leader != self.coordinator:
            self.coordinator, self.changed_at = leader, now
        alive = sorted({m.node_id for m in t.members() if m.status == "alive"} | {node.node_id})
        served: set[str] = {h.model for h in node.manager.workers.values() if h.state not in ("stopped", "stopping")}
        ready_elsewhere: set[str] = set()
        for m in t.members():
            if m.node_id == node.node_id or m.status != "alive":
                continue
            for r in m.facts.get("replicas", []):
                if r.get("state") in ("ready", "loading", "starting"):
                    served.add(r.get("model"))
                if r.get("state") == "ready" and any(p["node"] == m.node_id for p in node.placement.get(r["model"], [])):
                    ready_elsewhere.add(r["model"])
        claims = node.manager.vram_claims()
        planned: dict[str, float] = {}
        for model, gpus, _split in coord.share(node.serving(), node.node_id):
            for g in gpus:
                planned[g] = planned.get(g, 0.0) + node.estimates.get(model, 0.0) / max(1, len(gpus))
        free = {d["id"]: coord.free_vram(d, claims.get(d["id"], 0.0), planned.get(d["id"], 0.0))
                for d in node.facts().devices
                if d.get("usable", True) and not node.drainer.covers((d["id"],))}  # drained: none there
        demanded = {m for m, r in self.cluster.rates.rates(now).items() if r >= DEMANDED_RATE}
        return autonomy.Situation(
            now=now, coordinator=leader, changed_at=self.changed_at, rank=alive.index(node.node_id),
            demanded=frozenset(demanded & set(node.models())), served=frozenset(served), free_mib=free,
            needs_mib=dict(node.estimates), held=node.autonomous.held(),
            placed_here={m: tuple(g) for m, g, _s in coord.share(node.placement, node.node_id)},
            placed_ready_elsewhere=frozenset(ready_elsewhere))

    async def round(self, now: float) -> None:
        node = self.node
        if self.cluster.transport is None or node.leaving:
            return
        d = autonomy.decide(self.situation(now), self.config)
        changed = False
        for model in d.adopted:
            gpu = node.autonomous.adopt(model)
            node.record_event(f"{model}: the coordinator's placement adopts the autonomous replica on {gpu}")
            changed = True
        for model, why in d.retired.items():
            gpu = node.autonomous.retire(model)
            node.metrics.autonomous_retired.inc()
            log.info("model %s: retiring the autonomous replica on %s (%s); draining its requests", model, gpu, why)
            node.record_event(f"{model}: retiring autonomous replica on {gpu}: {why}", logged=True)
            task = asyncio.create_task(self._drain(model, gpu), name=f"retire {model}")
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        for model, why in d.evicted.items():
            gpu = node.autonomous.evict(model)
            node.metrics.autonomous_retired.inc()
            log.warning("model %s: unloading the autonomous replica on %s now: %s", model, gpu, why)
            node.record_event(f"{model}: autonomous replica on {gpu} unloaded: {why}", logged=True)
            changed = True
        for model, why in d.added.items():
            node.autonomous.add(model, d.hold[model], why)
            log.warning("model %s: autonomous replica: %s", model, why)
            node.record_event(f"{model}: autonomous replica on {d.hold[model]}: {why}", logged=True)
            changed = True
        if changed:
            self.cluster.wake()
            await node.reconcile()

    async def _drain(self, model: str, gpu: str) -> None:
        node = self.node
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            busy = [h for h in node.manager.replicas(model) if gpu in h.assignment.device_ids
                    and node.upstream_of(h).outstanding > 0]
            if not busy:
                break
            await asyncio.sleep(0.2)
        node.autonomous.unloaded(model, gpu)
        await node.reconcile()
        log.info("model %s: autonomous replica on %s unloaded", model, gpu)

    async def close(self) -> None:
        for t in list(self._drains):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

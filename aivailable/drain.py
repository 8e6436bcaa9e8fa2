"""The node's side of a maintenance drain (the rules are in aivailable/maintenance.py).

`Drainer` owns the node's drain state: it loads and saves ``STATE_DIR/drain.json``, tells the coordinator
through the node's facts, and holds on to the replicas a drain covers after the placement dropped them
(`kept`), so they serve until the model is ready on a GPU that is not drained. Their upstreams are
draining (routers use them only when nothing else is ready) and their facts say ``drained``. Once a
hand-over is done, settled and their requests in flight have finished, `round` releases them and the
node's reconcile stops them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aivailable import coordinator as coord
from aivailable import maintenance
from aivailable.maintenance import Drain

if TYPE_CHECKING:
    from aivailable.engine.manager import WorkerHandle
    from aivailable.node import Node

log = logging.getLogger("aivailable.drain")

SETTLE_S = 1.0
"""After the model is ready elsewhere, this long before a drained replica may stop: peers learn of the new
replica within a few gossip rounds, and until then they route to the old one (as in aivailable.leave)."""
GRACE_S = 60.0
"""Longest wait for a drained replica's requests in flight once its model is ready elsewhere."""
POLL_S = 0.25


class Drainer:
    """Drain state and hand-over of one node's replicas on drained GPUs."""

    def __init__(self, node: Node):
        self.node = node
        self.path = node.state_dir / maintenance.DRAIN_FILE
        self.state: Drain = maintenance.load(self.path)
        self.carried: set[str] = set()
        """Keys of replicas whose hand-over began before an undrain: they finish it (the placement moved them)."""
        self.released: set[str] = set()
        """Keys of kept workers whose hand-over is done: the next reconcile stops them."""
        self._handed_over_at: dict[str, float] = {}

    # -- state ---------------------------------------------------------------------------------
    def set(self, gpu: object, drained: bool) -> Drain:
        """Drain or undrain `gpu` (None: the whole node), saved before it takes effect."""
        devices = [d.id for d in self.node.inventory.devices]
        new = maintenance.change(self.state, gpu=gpu, drained=drained, devices=devices)
        maintenance.save(self.path, new)
        if new != self.state:
            what = f"GPU {gpu}" if gpu is not None else "node"
            text = f"{self.node.node_id}: {what} {'drained' if drained else 'undrained'} by the operator"
            log.info("%s", text)
            self.node.record_event(text, logged=True)
        self.carried |= {h.assignment.key for h in self._kept()}  # an undrain does not break a hand-over
        self.state = new
        return new

    def covers(self, device_ids: tuple[str, ...] | list[str]) -> bool:
        return self.state.covers(device_ids)

    def draining(self, h: WorkerHandle) -> bool:
        """The replica is on drained hardware, or finishes a hand-over: routers avoid it."""
        return self.covers(h.assignment.device_ids) or h.assignment.key in self.carried

    # -- kept replicas -------------------------------------------------------------------------
    def _placed(self) -> set[tuple[str, tuple[str, ...]]]:
        return {(m, g) for m, g, _s in coord.share(self.node.placement, self.node.node_id)}

    def holding(self) -> list[WorkerHandle]:
        """Workers on drained GPUs, or finishing a hand-over, that still run (placed or kept)."""
        return [h for h in self.node.manager.workers.values()
                if h.state not in ("stopped", "stopping") and self.draining(h)]

    def _kept(self) -> list[WorkerHandle]:
        if not self.state.active and not self.carried:
            return []
        placed = self._placed()
        return [h for h in self.holding()
                if (h.model, h.assignment.device_ids) not in placed and h.assignment.key not in self.released]

    def kept(self) -> list[tuple[str, dict]]:
        """(model, placement row) of the drained replicas the placement dropped but that still serve."""
        out = []
        for h in self._kept():
            a = h.assignment
            row: dict = {"node": self.node.node_id, "gpus": list(a.device_ids),
                         "split": list(a.tensor_split) if a.tensor_split else None}
            if a.kv_cache_type:
                row["kv_cache_type"] = a.kv_cache_type
            out.append((h.model, row))
        return out

    def replicas(self) -> list[dict]:
        """{model, state, drained, leaving, key} of every replica on live nodes (this one's included)."""
        node = self.node
        rows = [{"model": h.model, "state": h.state, "drained": self.draining(h), "leaving": node.leaving,
                 "key": h.assignment.key} for h in node.manager.workers.values()]
        t = node.cluster.transport
        if t is not None:
            for m in t.members():
                if m.node_id == node.node_id or m.status != "alive":
                    continue
                for r in m.facts.get("replicas", []):
                    rows.append({**r, "leaving": bool(m.facts.get("leaving")), "key": None})
        return rows

    # -- driver --------------------------------------------------------------------------------
    async def round(self, now: float) -> None:
        """Release kept replicas whose model is served elsewhere and whose requests have finished."""
        kept = self._kept()
        live = {h.assignment.key for h in self.node.manager.workers.values() if h.state != "stopped"}
        placed = {h.assignment.key for h in self.holding()} - {h.assignment.key for h in kept}
        self.carried -= placed  # placed here again: an ordinary replica
        self.carried &= live
        self.released &= live
        if not kept:
            self._handed_over_at.clear()
            return
        replicas = self.replicas()
        changed = False
        for h in kept:
            key = h.assignment.key
            if not maintenance.handed_over(h.model, [r for r in replicas if r["key"] != key]):
                self._handed_over_at.pop(key, None)
                continue
            since = self._handed_over_at.setdefault(key, now)
            if maintenance.may_stop(handed_over_for_s=now - since, outstanding=self.node.upstream_of(h).outstanding,
                                    settle_s=SETTLE_S, grace_s=GRACE_S):
                self.released.add(key)
                self.carried.discard(key)
                self._handed_over_at.pop(key, None)
                log.info("drain: %s is ready elsewhere; stopping its replica on %s", h.model,
                         "+".join(h.assignment.device_ids))
                self.node.record_event(f"{h.model}: drained replica on {self.node.node_id}:"
                                       f"{'+'.join(h.assignment.device_ids)} handed over and stopped", logged=True)
                changed = True
        if changed:
            await self.node.reconcile()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.round(time.monotonic())
            except Exception:  # never let one bad round stop serving
                log.exception("drain round failed")

    def announce(self) -> None:
        """Say at start that a drain kept in the state directory still applies."""
        if self.state.active:
            log.warning("this node is drained (%s): placement puts nothing on %s; `aivailable undrain` ends it",
                        self.path, "it" if self.state.node else "GPU " + ", ".join(sorted(self.state.gpus)))

    def view(self) -> dict:
        """The admin API's answer: what is drained and which replicas still run there."""
        return {"node": self.node.node_id, "drained": self.state.node, "drained_gpus": sorted(self.state.gpus),
                "holding": [{"model": h.model, "gpus": list(h.assignment.device_ids), "state": h.state}
                            for h in self.holding()]}

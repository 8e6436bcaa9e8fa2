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
        self.state = new
        if not new.active:
            self.released.clear()
            self._handed_over_at.clear()
        return new

    def covers(self, device_ids: tuple[str, ...] | list[str]) -> bool:
        return self.state.covers(device_ids)

    # -- kept replicas -------------------------------------------------------------------------
    def _placed(self) -> set[tuple[str, tuple[str, ...]]]:
        return {(m, g) for m, g, _s in coord.share(self.node.placement, self.node.node_id)}

    def holding(self) -> list[WorkerHandle]:
        """Workers on drained GPUs that still run (placed or kept for their hand-over)."""
        return [h for h in self.node.manager.workers.values()
                if h.state not in ("stopped", "stopping") and self.covers(h.assignment.device_ids)]

    def kept(self) -> list[tuple[str, dict]]:
        """(model, placement row) of the drained replicas the placement dropped but that still serve."""
        if not self.state.active:
            return []
        placed = self._placed()
        out = []
        for h in self.holding():
            a = h.assignment
            if (h.model, a.device_ids) in placed or a.key in self.released:
                continue
            row: dict = {"node": self.node.node_id, "gpus": list(a.device_ids),
                         "split": list(a.tensor_split) if a.tensor_split else None}
            if a.kv_cache_type:
                row["kv_cache_type"] = a.kv_cache_type
            out.append((h.model, row))
        return out

    def replicas(self) -> list[dict]:
        """{model, state, drained, leaving} of every replica on live nodes (this one's included)."""
        node = self.node
        rows = [{"model": h.model, "state": h.state, "drained": self.covers(h.assignment.device_ids),
                 "leaving": node.leaving} for h in node.manager.workers.values()]
        t = node.cluster.transport
        if t is not None:
            for m in t.members():
                if m.node_id == node.node_id or m.status != "alive":
                    continue
                for r in m.facts.get("replicas", []):
                    rows.append({**r, "leaving": bool(m.facts.get("leaving"))})
        return rows

    # -- driver --------------------------------------------------------------------------------
    async def round(self, now: float) -> None:
        """Release kept replicas whose model is served elsewhere and whose requests have finished."""
        kept = self.kept()
        if not kept:
            self._handed_over_at.clear()
            return
        replicas = self.replicas()
        placed = self._placed()
        changed = False
        for h in self.holding():
            key = h.assignment.key
            if (h.model, h.assignment.device_ids) in placed or key in self.released:
                continue
            if not maintenance.handed_over(h.model, replicas):
                self._handed_over_at.pop(key, None)
                continue
            since = self._handed_over_at.setdefault(key, now)
            if maintenance.may_stop(handed_over_for_s=now - since, outstanding=self.node.upstream_of(h).outstanding,
                                    settle_s=SETTLE_S, grace_s=GRACE_S):
                self.released.add(key)
                self._handed_over_at.pop(key, None)
                log.info("drain: %s is ready elsewhere; stopping its replica on %s", h.model,
                         "+".join(h.assignment.device_ids))
                self.node.record_event(f"{h.model}: drained replica on {self.node.node_id}:"
                                       f"{'+'.join(h.assignment.device_ids)} handed over and stopped", logged=True)
                changed = True
        if changed:
            await self.node.reconcile()
        live = {h.assignment.key for h in self.node.manager.workers.values()}
        self.released &= live

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

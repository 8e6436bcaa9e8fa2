"""Graceful leave on SIGTERM/SIGINT: hand this node's models over, drain requests, then stop.

1. **Announce.** The node's facts say ``leaving``; the coordinator (another node, or this one while it
   still leads) places nothing on its GPUs and re-places its replicas on other nodes. Routers everywhere,
   this node's included, prefer replicas on nodes that are not leaving. The node keeps running its
   workers (it ignores placements that drop them) so requests in progress are not cut.
2. **Hand over.** Wait until every model this node runs is ready on a live peer that is not leaving, at
   most ``HANDOVER_TIMEOUT_S``, then ``SETTLE_S`` more so every peer's router has learnt it too. Skipped
   when no such peer exists (a lone node, or the last one), and given up when the time runs out (the
   model is then unavailable until placed again, as after a crash).
3. **Leave the cluster.** Gossip says *left* (peers drop it at once, no suspicion period). A coordinator
   that leaves stops beating; the others elect a new one within one election timeout.
4. **Drain.** Stop listening; requests in flight, streams included, finish within ``DRAIN_GRACE_S``.
5. Stop the workers and exit 0. A second signal skips the waits (the default action: exit at once).

The decisions are the pure functions below; `hand_over` is their asyncio driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aivailable.clusterview import MemberInfo

if TYPE_CHECKING:
    from aivailable.node import Node

log = logging.getLogger("aivailable.leave")

HANDOVER_TIMEOUT_S = 60.0
"""Longest wait for this node's models to be ready elsewhere (a replica load takes seconds for a small
model, minutes for a large one on a slow disk); after it the node leaves anyway."""
DRAIN_GRACE_S = 30.0
"""Longest wait for requests in flight (streams included) once the node stops listening."""
POLL_S = 0.2
SETTLE_S = 1.0
"""After the hand-over, this long before saying goodbye: peers learn that the new replica is ready within a
few gossip rounds (0.2 s each on a LAN), and until their routers know it, this node's replica is the one
they send to. Leaving at once opened a window in which a peer had no replica to route to (503)."""


def takers(members: list[MemberInfo], self_id: str) -> list[str]:
    """Peers that can take this node's models: alive, facts known, not leaving themselves."""
    return sorted(m.node_id for m in members
                  if m.node_id != self_id and m.state == "alive" and m.facts is not None and not m.facts.leaving)


def pending_handover(models_here: set[str], members: list[MemberInfo], self_id: str) -> list[str]:
    """Models of this node that no live, non-leaving peer reports ready yet."""
    ok = set(takers(members, self_id))
    covered = {r.get("model") for m in members if m.node_id in ok and m.facts is not None
               for r in m.facts.replicas if r.get("state") == "ready"}
    return sorted(models_here - covered)


async def hand_over(node: Node, timeout_s: float = HANDOVER_TIMEOUT_S) -> dict:
    """Steps 1-2 of the module docstring. Returns what happened, for the log and the tests."""
    node.begin_leaving()
    models = {h.model for h in node.manager.workers.values() if h.state in ("ready", "loading", "starting")}
    t0 = time.monotonic()
    if node.cluster.transport is None or not models:
        return {"models": sorted(models), "pending": [], "waited_s": 0.0, "why": "nothing to hand over"}
    peers = takers(node.cluster.member_infos(), node.node_id)
    if not peers:
        log.info("leaving: no live peer can take %s; draining requests only", ", ".join(sorted(models)))
        return {"models": sorted(models), "pending": sorted(models), "waited_s": 0.0, "why": "no live peer"}
    log.info("leaving: asking the coordinator (%s) to move %s to %s; waiting up to %.0f s",
             node.cluster.transport.leader or "none elected yet", ", ".join(sorted(models)), ", ".join(peers),
             timeout_s)
    node.cluster.wake()
    pending = sorted(models)
    while time.monotonic() - t0 < timeout_s:
        pending = pending_handover(models, node.cluster.member_infos(), node.node_id)
        if not pending or not takers(node.cluster.member_infos(), node.node_id):
            break
        await asyncio.sleep(POLL_S)
    waited = round(time.monotonic() - t0, 2)
    if pending:
        log.warning("leaving: %s not ready on another node after %.1f s (no room, or no coordinator); leaving "
                    "anyway, the coordinator re-places them when it can", ", ".join(pending), waited)
        why = "timed out"
    else:
        log.info("leaving: %s served by other nodes now (%.1f s); leaving the cluster in %.1f s, once peers "
                 "know it", ", ".join(sorted(models)), waited, SETTLE_S)
        await asyncio.sleep(SETTLE_S)
        why = "handed over"
    return {"models": sorted(models), "pending": pending, "waited_s": waited, "why": why}

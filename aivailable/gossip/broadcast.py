"""The piggyback queue: updates waiting to ride on outgoing membership messages (sans-IO, no clock).

Like memberlist's ``TransmitLimitedQueue``: each update is sent at most ``limit`` times
(:func:`~aivailable.gossip.suspicion.retransmit_limit`), least-sent first and, among equals, newest
first; a newer update under the same key (one per node and kind) replaces the queued one. Items sit in
buckets by transmit count, so taking a message's worth costs O(items taken), not a sort of the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aivailable.gossip.messages import Facts


def update_size(update: Any) -> int:
    """Estimated JSON bytes of one update (the piggyback budget is in these units)."""
    if isinstance(update, Facts):
        return 48 + len(update.node) + len(json.dumps(update.facts, separators=(",", ":")))
    return 64 + len(update.node) + len(getattr(update, "addr", "")) + len(getattr(update, "accuser", ""))


@dataclass(slots=True)
class _Item:
    update: Any
    size: int
    transmits: int = 0


class BroadcastQueue:
    def __init__(self) -> None:
        self._where: dict[Any, _Item] = {}
        self._buckets: list[dict[Any, _Item]] = [{}]  # index = transmits so far

    def __len__(self) -> int:
        return len(self._where)

    def clear(self) -> None:
        self._where.clear()
        self._buckets = [{}]

    def put(self, key: Any, update: Any, size: int | None = None) -> None:
        """Queue ``update`` under ``key``, replacing (and resetting the count of) any older one."""
        old = self._where.pop(key, None)
        if old is not None:
            del self._buckets[old.transmits][key]
        item = _Item(update, update_size(update) if size is None else size)
        self._where[key] = item
        self._buckets[0][key] = item

    def take(self, budget: int, limit: int, at_least_one: bool = True) -> tuple[list[Any], int]:
        """Updates for one message within ``budget`` bytes; returns them and the bytes used."""
        chosen: list[tuple[int, Any, _Item]] = []
        used = 0
        for t, bucket in enumerate(self._buckets):
            for key in reversed(bucket):
                item = bucket[key]
                if used + item.size > budget and (chosen or not at_least_one):
                    break
                chosen.append((t, key, item))
                used += item.size
            else:
                continue
            break
        for t, key, item in reversed(chosen):  # re-insert oldest first: the next bucket stays newest-last
            del self._buckets[t][key]
            item.transmits += 1
            if item.transmits >= limit:
                del self._where[key]
                continue
            if item.transmits == len(self._buckets):
                self._buckets.append({})
            self._buckets[item.transmits][key] = item
        return [item.update for _, _, item in chosen], used

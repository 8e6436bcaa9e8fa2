"""The simulator's network and stand-in solver (:mod:`aivailable.gossip.sim`): seeded loss, duplicates,
delays and partitions; a trivial placement function."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Network", "Tracked", "trivial_place"]


def trivial_place(
    view: Mapping[str, dict[str, Any]], demand: list[str], previous: dict[str, Any]
) -> dict[str, Any]:
    """Stand-in solver: keep a model where it is if that node is live, else the least-loaded live node
    (ties: most free VRAM in its facts, then node id)."""
    load = dict.fromkeys(sorted(view), 0)
    out: dict[str, Any] = {}
    for model in sorted(demand):
        prev = previous.get(model)
        if prev is not None and prev["node"] in view:
            out[model] = prev
            load[prev["node"]] += 1
    for model in sorted(demand):
        if model not in out and load:
            node = min(load, key=lambda n: (load[n], -_free(view[n]), n))
            out[model] = {"node": node, "gpu": "gpu0"}
            load[node] += 1
    return out


def _free(facts: dict[str, Any]) -> int:
    return sum(d.get("free", 0) for d in facts.get("devices", ()))


@dataclass(frozen=True, slots=True)
class Tracked:
    """A message whose sender wants to hear whether it was answered (its Outbound had an ack)."""

    msg: Any
    ack: Any
    gen: int


class Network:
    """Seeded lossy network: drop, duplicate, delay; partitions as groups (same group = connected)."""

    def __init__(self, rng: random.Random, drop: float, dup: float, delay: tuple[float, float]):
        self.rng, self.drop, self.dup, self.delay = rng, drop, dup, delay
        self.group: dict[str, int] = {}
        self.changed_at = 0.0

    def connected(self, a: str, b: str) -> bool:
        return self.group.get(a, 0) == self.group.get(b, 0)

    def partition(self, groups: list[list[str]], now: float) -> None:
        self.group = {n: i for i, g in enumerate(groups) for n in g}
        self.changed_at = now

    def cut(self, side: list[str], now: float) -> None:
        """Cut ``side`` off from every other node (the rest keep their groups)."""
        new = max(self.group.values(), default=0) + 1
        self.group = {**self.group, **dict.fromkeys(side, new)}
        self.changed_at = now

    def isolate(self, node: str, now: float) -> None:
        self.cut([node], now)

    def heal(self, now: float) -> None:
        self.group, self.changed_at = {}, now

    def delays(self, a: str, b: str) -> list[float]:
        if not self.connected(a, b) or self.rng.random() < self.drop:
            return []
        copies = 2 if self.rng.random() < self.dup else 1
        return [self.rng.uniform(*self.delay) for _ in range(copies)]

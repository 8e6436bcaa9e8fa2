"""Serving without a coordinator: availability before optimality.

Placement is derived state. When a node has had no coordinator for `grace_s` (a minority after a
majority loss, or a partition), and a model that clients ask for *at this node* has no replica on any
reachable node, the node loads it onto **its own** free VRAM: an *autonomous* replica. Only its own GPUs,
so no two nodes ever book one card; and nodes act one after another (`stagger_s` per rank among the
reachable nodes, by node id), so the first one's replica shows up in gossip before the next would load
the same model.

When a coordinator is back, its term-fenced placement wins. An autonomous replica is retired (drained,
then unloaded) as soon as the placement serves its model with a ready replica on another node, or at the
latest `retire_after_s` after the coordinator appeared. A model the placement puts on this same GPU is simply
adopted (the worker is the one the placement asks for). And whatever the coordinator's state, a placement
(term-fenced, so always the newest) that needs the VRAM an autonomous replica holds gets it: that replica
goes at once, without a drain.

`decide` is pure: the caller (autonomy_loop.py) passes what it observed and applies the answer to the
node's `AutonomousReplicas` (autonomy_state.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutonomyConfig:
    grace_s: float = 10.0
    """No coordinator for this long before a node serves on its own (0 turns autonomous serving off)."""
    stagger_s: float = 3.0
    """Extra wait per rank among reachable nodes, so that one node loads a model, not every node at once."""
    retire_after_s: float = 120.0
    """With a coordinator back, an autonomous replica it did not replace is retired after this at the latest."""


@dataclass(frozen=True)
class Situation:
    """What a node sees at `now` (monotonic seconds)."""

    now: float
    coordinator: str | None
    """The reachable coordinator this node follows, or None."""
    changed_at: float
    """When `coordinator` last changed (to None or to someone)."""
    rank: int
    """This node's index among the reachable nodes sorted by id."""
    demanded: frozenset[str]
    """Models clients asked this node for recently."""
    served: frozenset[str]
    """Models with a replica (ready or loading) on some reachable node, this one included."""
    free_mib: Mapping[str, float]
    """This node's usable GPUs: VRAM left after the placement's share and the autonomous replicas (negative
    when a new placement needs more than the autonomous replicas leave)."""
    needs_mib: Mapping[str, float]
    """VRAM one replica of each model needs (models without an estimate cannot be loaded)."""
    held: Mapping[str, str] = field(default_factory=dict)
    """This node's autonomous replicas: model -> GPU id."""
    placed_here: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The current placement's models on this node -> their GPUs."""
    placed_ready_elsewhere: frozenset[str] = frozenset()
    """Models the current placement serves with a ready replica on another node."""


@dataclass(frozen=True)
class Decision:
    hold: dict[str, str]
    """Autonomous replicas to run now: model -> GPU id."""
    added: dict[str, str]
    """New ones, with the reason (for the log and the status page)."""
    retired: dict[str, str]
    """Ones to drain and unload, with the reason."""
    adopted: tuple[str, ...] = ()
    """Ones the placement now asks for on the same GPU (kept running, no longer autonomous)."""
    evicted: dict[str, str] = field(default_factory=dict)
    """Ones to unload at once, without a drain, because the placement needs their VRAM; with the reason."""


def retire_reason(model: str, gpu: str, s: Situation, cfg: AutonomyConfig) -> str | None:
    """Why an autonomous replica of `model` on `gpu` must go now, or None to keep it."""
    if s.coordinator is None:
        return None
    if model in s.placed_ready_elsewhere:
        return f"coordinator {s.coordinator}'s placement serves {model} on another node"
    if s.now - s.changed_at >= cfg.retire_after_s:
        return f"coordinator {s.coordinator} did not place it within {cfg.retire_after_s:.0f} s"
    return None


def due(s: Situation, cfg: AutonomyConfig) -> bool:
    """Whether this node may load models on its own now."""
    if cfg.grace_s <= 0 or s.coordinator is not None:
        return False
    return s.now - s.changed_at >= cfg.grace_s + s.rank * cfg.stagger_s


def fit(need: float, free: Mapping[str, float]) -> str | None:
    """The GPU with the least free VRAM that still holds `need` (ties by id), or None."""
    fits = sorted((f, g) for g, f in free.items() if f >= need)
    return fits[0][1] if fits else None


def decide(s: Situation, cfg: AutonomyConfig) -> Decision:
    """Which autonomous replicas this node runs, adds and retires."""
    hold: dict[str, str] = {}
    retired: dict[str, str] = {}
    evicted: dict[str, str] = {}
    adopted = []
    free = dict(s.free_mib)
    for model, gpu in sorted(s.held.items()):
        if gpu in s.placed_here.get(model, ()):
            adopted.append(model)
            continue
        if free.get(gpu, 0.0) < 0:  # the placement needs this VRAM: it wins, at once
            free[gpu] = free.get(gpu, 0.0) + s.needs_mib.get(model, 0.0)
            evicted[model] = f"the placement needs the VRAM of {gpu}"
            continue
        why = retire_reason(model, gpu, s, cfg)
        if why is None:
            hold[model] = gpu
        else:
            retired[model] = why
    added: dict[str, str] = {}
    if due(s, cfg):
        waited = s.now - s.changed_at
        for model in sorted(s.demanded - s.served - set(hold)):
            need = s.needs_mib.get(model)
            gpu = fit(need, free) if need else None
            if gpu is None:
                continue
            free[gpu] -= need  # type: ignore[operator]
            hold[model] = gpu
            added[model] = (f"no coordinator for {waited:.0f} s and no reachable node serves it; "
                            f"loading it on own GPU {gpu}")
    return Decision(hold=hold, added=added, retired=retired, adopted=tuple(adopted), evicted=evicted)

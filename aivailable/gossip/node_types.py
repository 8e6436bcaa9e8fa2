"""The node core's configuration and what it hands its driver (:mod:`aivailable.gossip.node_core`)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

from aivailable.errors import ConfigError
from aivailable.gossip.election import ElectionConfig, HardState
from aivailable.gossip.membership_types import MembershipConfig

__all__ = ["NodeCoreConfig", "NodeReady", "Note", "Outbound", "PlacementApplied", "PlacementRefused"]


@dataclass(frozen=True, slots=True)
class NodeCoreConfig:
    """Timers in seconds. Field defaults are the LAN profile; :meth:`local` is a delta from it."""

    membership: MembershipConfig = MembershipConfig()
    election: ElectionConfig = ElectionConfig()
    bootstrap_grace: float = 2.0  # wait this long for seeds/peers before founding alone
    seed_wait: float = 30.0  # new nodes wait this long for every join seed to answer before founding
    placement_resend: float = 0.5  # leader re-sends the placement to live members that did not ack it
    placement_refresh: float = 10.0  # ... and to every live member this often (restarted from scratch)
    max_candidates: int = 8  # unverified mDNS candidates at a time; more are dropped (a flood is cheap)
    candidate_attempts: int = 3  # pushes to an unverified candidate before it is forgotten
    candidate_interval: float = 2.0  # between two pushes to one candidate
    candidate_cooldown: float = 60.0  # a forgotten candidate's address is ignored this long

    @classmethod
    def lan(cls) -> NodeCoreConfig:
        return cls(membership=MembershipConfig.lan(), election=ElectionConfig.lan())

    @classmethod
    def local(cls) -> NodeCoreConfig:
        """All nodes on one host (development, tests)."""
        return replace(
            cls.lan(), membership=MembershipConfig.local(), election=ElectionConfig.local(),
            bootstrap_grace=0.5, seed_wait=5.0, placement_resend=0.2, placement_refresh=2.0,
            candidate_interval=0.5, candidate_cooldown=10.0,
        )

    def validate(self) -> NodeCoreConfig:
        for name in ("placement_resend", "placement_refresh", "candidate_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds", param=name)
        for name in ("bootstrap_grace", "seed_wait", "candidate_cooldown"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds", param=name)
        for name in ("max_candidates", "candidate_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", param=name)
        self.membership.validate()
        self.election.validate()
        return self


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message to send to ``addr`` (None: the node ``to`` has no known address; count it, drop it).
    When ``ack`` is set, report the outcome with :meth:`NodeCore.delivered` (a 2xx answer is ok)."""

    addr: str | None
    msg: Any
    to: str = ""
    ack: Hashable | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """A line for the node's event list; ``log_level`` set: also log ``log`` (or ``text``) at that level."""

    text: str
    log_level: int | None = None
    log: str | None = None


@dataclass(frozen=True, slots=True)
class PlacementApplied:
    """The fence accepted this placement (from ``src``; this node's own publications included)."""

    src: str
    term: int
    version: int
    assignments: dict[str, Any]
    node_term: int  # this node's election term when it accepted it


@dataclass(frozen=True, slots=True)
class PlacementRefused:
    """The fence refused a placement: ``stale`` from an older term than one seen, else a repeat."""

    src: str
    term: int
    version: int
    stale: bool


@dataclass(frozen=True, slots=True)
class NodeReady:
    """In this order: persist ``hard_state`` and the last of ``placements``, send ``messages``, act on
    ``events`` (core events, :class:`Note`, :class:`PlacementApplied`), then :meth:`NodeCore.advance`.
    ``changed``: membership, a member's facts, the leader or the voter set changed."""

    hard_state: HardState | None
    placements: tuple[tuple[int, int, dict[str, Any]], ...]
    messages: tuple[Outbound, ...]
    events: tuple[Any, ...]
    changed: bool

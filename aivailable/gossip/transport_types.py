"""The cluster transport's configuration and what it reports (:mod:`aivailable.gossip.transport`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from aivailable.errors import ConfigError, NodeError
from aivailable.gossip import envelope
from aivailable.gossip.election import ElectionConfig
from aivailable.gossip.membership_types import MembershipConfig
from aivailable.gossip.node_types import NodeCoreConfig

__all__ = ["MemberView", "NotLeaderError", "TransportConfig"]


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Timers in seconds. Field defaults are the LAN profile; :meth:`local` is a delta from it."""

    tick_interval: float = 0.05  # cores' tick period; finer than every core timer
    bootstrap_grace: float = 2.0  # wait this long for seeds/discovered peers before founding alone
    seed_wait: float = 30.0  # new nodes wait this long for every join seed to answer before founding
    send_timeout: float = 1.0  # one POST, connect included; a later answer is useless to SWIM anyway
    max_inflight_per_peer: int = 32  # POSTs in flight to one address; beyond it messages are dropped
    placement_resend: float = 0.5  # leader re-sends the placement to live members that did not ack it
    placement_refresh: float = 10.0  # ... and to every live member this often (restarted from scratch)
    max_bytes: int = envelope.MAX_BYTES  # one envelope; larger bodies are refused unread (413)
    read_timeout: float = 5.0  # a whole body must arrive within this (slow senders are dropped)
    reject_log_interval: float = 60.0  # at most one warning per peer address per interval
    events_max: int = 200  # entries kept in :attr:`ClusterTransport.events`
    max_candidates: int = 8  # unverified mDNS peers at a time (NodeCoreConfig documents the four below)
    candidate_attempts: int = 3
    candidate_interval: float = 2.0
    candidate_cooldown: float = 60.0

    @classmethod
    def lan(cls) -> TransportConfig:
        return cls()

    @classmethod
    def local(cls) -> TransportConfig:
        """All nodes on one host (development, tests)."""
        return replace(cls.lan(), bootstrap_grace=0.5, seed_wait=5.0, placement_resend=0.2, placement_refresh=2.0,
                       candidate_interval=0.5, candidate_cooldown=10.0)

    def core(self, membership: MembershipConfig, election: ElectionConfig) -> NodeCoreConfig:
        """The node core's configuration: these timers plus the membership and election profiles."""
        return NodeCoreConfig(
            membership=membership,
            election=election,
            bootstrap_grace=self.bootstrap_grace,
            seed_wait=self.seed_wait,
            placement_resend=self.placement_resend,
            placement_refresh=self.placement_refresh,
            max_candidates=self.max_candidates,
            candidate_attempts=self.candidate_attempts,
            candidate_interval=self.candidate_interval,
            candidate_cooldown=self.candidate_cooldown,
        ).validate()

    def validate(self) -> TransportConfig:
        for name in (
            "tick_interval",
            "send_timeout",
            "placement_resend",
            "placement_refresh",
            "read_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds", param=name)
        for name in ("bootstrap_grace", "seed_wait"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds", param=name)
        if self.max_inflight_per_peer < 1:
            raise ConfigError("max_inflight_per_peer must be >= 1", param="max_inflight_per_peer")
        if self.max_bytes < 1024:
            raise ConfigError("max_bytes must be >= 1024", param="max_bytes")
        return self


class NotLeaderError(NodeError):
    """Only the leader publishes placements; ``leader_hint`` is the leader this node knows, if any."""

    http_status = 409
    error_type = "invalid_request_error"
    code = "not_leader"

    def __init__(self, leader_hint: str | None):
        super().__init__(f"this node is not the cluster leader (leader: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member as this node sees it (this node included). ``status``: alive/suspect/dead/left."""

    node_id: str
    address: str
    status: str
    incarnation: int
    facts: dict[str, Any]
    facts_version: int

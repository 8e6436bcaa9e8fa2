"""The membership core's configuration and the events of its own it reports
(:mod:`aivailable.gossip.membership`; member status changes are :mod:`aivailable.gossip.members`' events)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from aivailable.errors import ConfigError

__all__ = ["FactsChanged", "MembershipConfig", "Refuted"]


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Timers in seconds. Field defaults are the LAN profile; :meth:`local` is a delta from it."""

    probe_interval: float = 0.5  # one direct probe per interval; detection time scales with it
    probe_timeout: float = 0.2  # wait for a direct ack before asking others; < probe_interval, > LAN RTT
    indirect_checks: int = 3  # members asked to probe for us; more = fewer false suspicions, more traffic
    suspicion_mult: float = 2.0  # min suspicion = mult * max(1, log10(n)) * probe_interval (suspicion.py)
    suspicion_max_timeout_mult: float = 3.0  # max suspicion = this * min; until confirmations arrive
    suspicion_confirmations: int = 1  # independent accusers that shrink max -> min (memberlist: mult - 2)
    retransmit_mult: int = 4  # each update is piggybacked mult * ceil(log10(n + 1)) times
    gossip_interval: float = 0.2  # extra push of pending updates; lower = faster convergence, more packets
    gossip_nodes: int = 3  # fan-out of each gossip round
    gossip_to_dead: float = 30.0  # keep gossiping to the dead this long, so a healed side can refute
    push_pull_interval: float = 10.0  # full-state sync period (x push_pull_scale above 32 nodes)
    reconnect_interval: float = 2.0  # ping one recently dead member (sync if it answers); retry silent seeds
    reap_timeout: float = 60.0  # forget a dead member after this; >= gossip_to_dead
    awareness_max: int = 8  # local health multiplies probe interval/timeout by 1..awareness_max
    max_piggyback_bytes: int = 8192  # estimated JSON bytes of updates per message (at least one is sent)

    @classmethod
    def lan(cls) -> MembershipConfig:
        return cls()

    @classmethod
    def local(cls) -> MembershipConfig:
        """All nodes on one host (development, tests): loopback RTT, so everything runs ~5x faster."""
        return replace(
            cls.lan(),
            probe_interval=0.1,
            probe_timeout=0.04,
            gossip_interval=0.05,
            gossip_to_dead=10.0,
            push_pull_interval=2.0,
            reconnect_interval=0.5,
            reap_timeout=20.0,
        )

    def validate(self) -> MembershipConfig:
        """Raise :class:`ConfigError` naming the first bad field; return self for chaining."""
        for name in (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "reconnect_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds", param=name)
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("probe_timeout must be < probe_interval", param="probe_timeout")
        for name in ("retransmit_mult", "gossip_nodes", "awareness_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", param=name)
        if self.suspicion_mult <= 0:
            raise ConfigError("suspicion_mult must be > 0", param="suspicion_mult")
        for name in ("indirect_checks", "suspicion_confirmations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0", param=name)
        if self.suspicion_max_timeout_mult < 1:
            raise ConfigError("suspicion_max_timeout_mult must be >= 1", param="suspicion_max_timeout_mult")
        if self.gossip_to_dead < 0:
            raise ConfigError("gossip_to_dead must be >= 0 seconds", param="gossip_to_dead")
        if self.reap_timeout < self.gossip_to_dead:
            raise ConfigError("reap_timeout must be >= gossip_to_dead", param="reap_timeout")
        if self.max_piggyback_bytes < 64:
            raise ConfigError("max_piggyback_bytes must be >= 64", param="max_piggyback_bytes")
        return self


@dataclass(frozen=True, slots=True)
class FactsChanged:
    node: str
    version: int


@dataclass(frozen=True, slots=True)
class Refuted:
    """Event: this node was suspected or declared dead and answered with ``incarnation``."""

    incarnation: int

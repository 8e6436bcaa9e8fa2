"""Routed network namespaces for chaos runs, with partitions that cut node-to-node traffic only.

Each node gets its own namespace joined to the root namespace by a veth pair (node ``10.78.i.2``, root
side ``10.78.i.1``); the root namespace routes between them. Clients and the harness run in the root
namespace and reach every node directly, as users on both sides of a broken switch would (a load balancer
keeps health-checking both halves). A partition is a pair of ``ip rule ... blackhole`` policy rules per
pair of nodes on opposite sides: forwarded packets between them are dropped (TCP sees silence, as with a
dead link, not a reset), while each side's own traffic and every client's keep flowing. Healing deletes
the rules. No iptables needed; root only.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.78"
RULE_PRIORITY = 20000  # below the main table's rule (32766), above nothing else we install


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@dataclass
class RoutedNet:
    """``count`` namespaces routed through the root namespace; ``address(i)`` is node i's address (1-based)."""

    count: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    made: list[str] = field(default_factory=list)
    rules: list[tuple[str, str]] = field(default_factory=list)
    _forward_before: str | None = None

    def ns(self, i: int) -> str:
        return f"aic{i}{self.tag}"

    @staticmethod
    def address(i: int) -> str:
        return f"{SUBNET}.{i}.2"

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns(i))

    def __enter__(self) -> RoutedNet:
        fwd = Path("/proc/sys/net/ipv4/ip_forward")
        self._forward_before = fwd.read_text().strip()
        fwd.write_text("1\n")
        try:
            for i in range(1, self.count + 1):
                ns, veth = self.ns(i), f"aiv{i}{self.tag}"
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("addr", "add", f"{SUBNET}.{i}.1/24", "dev", veth)
                ip("link", "set", veth, "up")
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "route", "add", "default", "via", f"{SUBNET}.{i}.1")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def split(self, side_a: list[int], side_b: list[int]) -> None:
        """Drop all traffic between nodes of ``side_a`` and nodes of ``side_b`` (both directions)."""
        for a in side_a:
            for b in side_b:
                for src, dst in ((a, b), (b, a)):
                    pair = (f"{SUBNET}.{src}.0/24", f"{SUBNET}.{dst}.0/24")
                    ip("rule", "add", "priority", str(RULE_PRIORITY), "from", pair[0], "to", pair[1], "blackhole")
                    self.rules.append(pair)

    def heal(self) -> None:
        """Remove every partition rule."""
        while self.rules:
            src, dst = self.rules.pop()
            ip("rule", "del", "priority", str(RULE_PRIORITY), "from", src, "to", dst, "blackhole", check=False)

    def __exit__(self, *exc: object) -> None:
        self.heal()
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)  # deleting the namespace deletes its veth pair
        self.made.clear()
        if self._forward_before is not None:
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/ipv4/ip_forward").write_text(self._forward_before + "\n")

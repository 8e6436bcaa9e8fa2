"""Throw-away network namespaces joined by a bridge (shared/TESTING.md recipe); root only."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator

import pytest


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@contextlib.contextmanager
def namespaces(count: int, subnet: str = "10.77.0") -> Iterator[list[tuple[str, str]]]:
    """`count` namespaces on one bridge, as [(name, address)]; skipped where `ip netns add` is refused.

    Addresses exist only inside the namespaces; all of them are deleted on exit (kill the processes
    started in them first)."""
    tag = secrets.token_hex(3)
    switch = f"aisw{tag}"
    made: list[str] = []
    try:
        r = ip("netns", "add", switch, check=False)
        if r.returncode != 0:
            pytest.skip(f"ip netns add failed: {r.stderr.strip()}")
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", switch, "link", "set", "br0", "up")
        out = []
        for i in range(1, count + 1):
            ns, addr = f"ain{i}{tag}", f"{subnet}.{i}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", switch, "link", "set", f"v{i}", "master", "br0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            out.append((ns, addr))
        yield out
    finally:
        for ns in reversed(made):
            ip("netns", "del", ns, check=False)

"""Zero-configuration peer discovery: announce and browse ``_aivailable._tcp.local.`` over mDNS.

Each node registers one service instance named after its node id, with TXT properties ``v`` (format
version), ``cluster`` (:func:`aivailable.gossip.envelope.cluster_id_hash` of the secret), ``node`` (node
id), ``addr`` ("host:port" its cluster transport listens on) and ``port``; never the secret. Browsing
reports each peer whose ``cluster`` equals ours through ``on_peer(addr)`` (the node passes the
transport's ``discovered``). The cluster id is public (anyone can read it from an announcement), so a
record proves nothing: the node core treats a reported address as an unverified candidate that counts
only once a member answers from it with a signed message (:mod:`aivailable.gossip.node_core`). Peers of
other clusters are counted in :attr:`Discovery.ignored` and otherwise ignored.

Interfaces (``interfaces=None``):

* ``host`` is a specific address: announce and browse on that address only.
* ``host`` is a wildcard (``0.0.0.0``, ``::``, empty): use the address of the interface that routes
  mDNS (``224.0.0.251``), else the default route (:func:`primary_address`): that is the address a
  peer can reach and the one announced. A multi-homed machine that should announce elsewhere passes
  ``host`` (and so ``interfaces``) explicitly. ``InterfaceChoice.Default`` is the fallback only when no
  such address exists; ``InterfaceChoice.All`` is never used (it would announce one address on every
  network, including container bridges).

Registration uses ``cooperating_responders=True`` (skips ~1.2 s of name-conflict probing; instance
names are unique node ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["SERVICE_TYPE", "Discovery", "advertise_host", "primary_address"]

log = logging.getLogger("aivailable.discovery")

SERVICE_TYPE = "_aivailable._tcp.local."
TXT_VERSION = "1"
RESOLVE_TIMEOUT_MS = 3000
MAX_RESOLVING = 16  # records resolved at once; a flood of announced names waits for the next announcement
MAX_PEERS = 256  # peers remembered; beyond it new ones are dropped (the node core caps candidates too)
_WILDCARDS = ("", "0.0.0.0", "::", "*")


def primary_address() -> str | None:
    """The local IPv4 address packets to the mDNS group (else to the default route) leave from, or None.

    Uses an unconnected-UDP ``connect`` (no packet is sent)."""
    for target in ("224.0.0.251", "192.0.2.1"):  # mDNS group; TEST-NET-1 via the default route
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 5353))
            addr = s.getsockname()[0]
            if addr != "0.0.0.0":
                return addr
    return None


def advertise_host(host: str) -> str:
    """The address to announce for a node listening on ``host`` (a wildcard becomes the primary one)."""
    if host not in _WILDCARDS:
        return host
    return primary_address() or "127.0.0.1"


def _instance(node_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", node_id)[:63] or "node"
    return name


class Discovery:
    """Announce this node and report peers of the same cluster; ``start``/``stop`` in the event loop."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        cluster_hash: str,
        interfaces: list[str] | None,
        on_peer: Callable[[str], None],
    ):
        self.node_id, self.port, self.cluster_hash = node_id, port, cluster_hash
        self.host = advertise_host(host)
        self.on_peer = on_peer
        if interfaces is not None:
            self.interfaces: list[str] | InterfaceChoice = list(interfaces)
        elif host not in _WILDCARDS or primary_address() is not None:
            self.interfaces = [self.host]
        else:
            self.interfaces = InterfaceChoice.Default
        self.addr = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        self.peers: dict[str, str] = {}  # node id -> address reported
        self.ignored: set[str] = set()  # instance names of other clusters seen
        self.foreign: dict[str, dict[str, str]] = {}
        """Instance name -> {node, addr, cluster} of each node of another cluster seen (at most MAX_PEERS)."""
        self.dropped = 0  # records not looked at: MAX_RESOLVING or MAX_PEERS reached
        self._names: dict[str, str] = {}  # instance name -> node id
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: dict[str, asyncio.Task] = {}
        self._announce: asyncio.Future | None = None
        inst = _instance(node_id)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{inst}.{SERVICE_TYPE}",
            port=port,
            parsed_addresses=[self.host],
            server=f"{inst}.local.",
            properties={
                "v": TXT_VERSION,
                "cluster": cluster_hash,
                "node": node_id,
                "addr": self.addr,
                "port": str(port),
            },
        )

    async def start(self) -> None:
        ip_version = None
        if isinstance(self.interfaces, list):
            v6 = any(ipaddress.ip_address(i).version == 6 for i in self.interfaces)
            ip_version = IPVersion.All if v6 else IPVersion.V4Only
        self._azc = AsyncZeroconf(interfaces=self.interfaces, ip_version=ip_version)
        self._announce = await self._azc.async_register_service(self._info, cooperating_responders=True)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        log.info("mDNS: announcing %s as %s on %s", self.node_id, self.addr, self.interfaces)

    async def stop(self) -> None:
        for task in self._resolving.values():
            task.cancel()
        await asyncio.gather(*self._resolving.values(), return_exceptions=True)
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._announce is not None and not self._announce.done():
            self._announce.cancel()
        if self._azc is not None:
            await self._azc.async_close()  # unregisters (goodbye packets) and closes the sockets
            self._azc = None

    def _on_change(
        self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            node = self._names.pop(name, None)
            if node is not None:
                self.peers.pop(node, None)  # reported again if it comes back
            return
        if name not in self._resolving:
            if len(self._resolving) >= MAX_RESOLVING:
                self.dropped += 1
                return
            task = asyncio.get_running_loop().create_task(self._resolve(name))
            self._resolving[name] = task
            task.add_done_callback(lambda _t, name=name: self._resolving.pop(name, None))

    async def _resolve(self, name: str) -> None:
        if self._azc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: no answer resolving %s", name)
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        if props.get("cluster") != self.cluster_hash:
            if name not in self.ignored:
                self.ignored.add(name)
                self._foreign(name, props, info)
            return
        node = props.get("node", "")
        if not node or node == self.node_id:
            return
        addr = props.get("addr") or ""
        if not addr:
            addrs = info.parsed_addresses()
            if not addrs or not info.port:
                return
            addr = f"{addrs[0]}:{info.port}"
        if self.peers.get(node) == addr:
            return
        if node not in self.peers and len(self.peers) >= MAX_PEERS:
            self.dropped += 1
            return
        self.peers[node], self._names[name] = addr, node
        log.info("mDNS: found peer %s at %s", node, addr)
        try:
            self.on_peer(addr)
        except Exception:
            log.exception("mDNS: on_peer(%s) failed", addr)

    def _foreign(self, name: str, props: dict[str, str], info: AsyncServiceInfo) -> None:
        """A node of another cluster: warn once on the console (the first one), list it for the status page."""
        addr = props.get("addr") or ""
        if not addr and info.parsed_addresses() and info.port:
            addr = f"{info.parsed_addresses()[0]}:{info.port}"
        first = not self.foreign
        if len(self.foreign) < MAX_PEERS:
            self.foreign[name] = {"node": props.get("node", "")[:128], "addr": addr[:128],
                                  "cluster": props.get("cluster", "")[:16]}
        if first:
            log.warning("mDNS: node %s at %s belongs to another cluster (another cluster secret) and is ignored. "
                        "If it should be in this cluster, start it with this cluster's join token "
                        "(`aivailable token` prints it)", props.get("node") or name, addr or "?")
        else:
            log.info("mDNS: ignoring %s (another cluster)", name)

"""How this node reaches a peer over HTTP: the one place that turns a peer's address into a URL and
connection options (gossip, forwarded API requests, model files and key sets all go through it).

With cluster TLS (the default, aivailable/gossip/tls.py) a peer at API address ``host:port`` is reached at
``https://host:port+1`` with this node's certificate; a peer whose node id is known must present a
certificate naming that id (checked in the handshake, through SNI), a seed address any certificate of
the cluster. With ``--insecure-cluster`` it is plain ``http://host:port``, as the API.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from aivailable.gossip import tls


@dataclass
class PeerDialer:
    """URLs and aiohttp request options for peers; `tls` None means plaintext (--insecure-cluster)."""

    tls: tls.ClusterTLS | None = None
    _pinned: ssl.SSLContext | None = field(default=None, repr=False)
    _any: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tls is not None:
            self._pinned = self.tls.client_context(pinned=True)
            self._any = self.tls.client_context(pinned=False)

    @property
    def secure(self) -> bool:
        return self.tls is not None

    def base_url(self, address: str) -> str:
        """Scheme, host and port for the peer whose API address is `address` (host:port)."""
        if self.tls is None:
            return f"http://{address}"
        return f"https://{tls.cluster_address(address)}"

    def url(self, address: str, path: str) -> str:
        return self.base_url(address) + path

    def options(self, node_id: str | None) -> dict[str, Any]:
        """Keyword arguments for an aiohttp request to the peer `node_id` (None: a seed, id not known)."""
        if self.tls is None:
            return {}
        if node_id:
            return {"ssl": self._pinned, "server_hostname": tls.node_dns_name(node_id)}
        return {"ssl": self._any}

    async def post(self, session: aiohttp.ClientSession, address: str, node_id: str | None, path: str, data: bytes,
                   *, timeout_s: float = 5.0, max_bytes: int = 1 << 20) -> tuple[int, bytes]:
        """POST `data` (a signed envelope) to `path` on the peer `node_id` at `address`: (HTTP status, body).
        Raises aiohttp.ClientError or TimeoutError when the peer cannot be reached or answers too much."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(self.url(address, path), data=data, timeout=timeout,
                                headers={"Content-Type": "application/octet-stream"}, **self.options(node_id)) as r:
            body = bytearray()
            while chunk := await r.content.read(max_bytes + 1 - len(body)):  # read(n) may return less than n
                body += chunk
                if len(body) > max_bytes:
                    raise aiohttp.ClientPayloadError(f"answer over {max_bytes} bytes")
            return r.status, bytes(body)

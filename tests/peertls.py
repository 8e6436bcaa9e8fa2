"""Talking to a node's TLS cluster port from a test, as a peer holding the cluster secret would."""

from __future__ import annotations

import functools
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from aivailable.gossip import tls


def _secret(secret: bytes | str) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


@functools.lru_cache(maxsize=32)
def peer_context(secret: bytes | str, node_id: str = "test-peer") -> ssl.SSLContext:
    """A client context with a certificate for `node_id` from the CA of `secret` (any cluster node accepted)."""
    d = Path(tempfile.mkdtemp(prefix="peertls-"))
    return tls.node_tls(_secret(secret), node_id, d).client_context(pinned=False)


def cluster_url(url: str) -> str:
    """https://host:port+1 for a node whose API is at http://host:port."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    return f"https://{host}:{tls.cluster_port(int(port))}"


def post(url: str, path: str, data: bytes | None, secret: bytes | str, node_id: str = "test-peer",
         headers: dict | None = None, timeout: float = 10.0, method: str = "POST") -> tuple[int, bytes]:
    """`method` (POST) `data` to `path` on the cluster port of the node at API `url`: (status, body)."""
    req = urllib.request.Request(cluster_url(url) + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=peer_context(secret, node_id)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

"""The node's listening sockets, opened in one place: the client API (HTTP, or HTTPS with `tls`), the
cluster port (API port + 1: mutual TLS for peers, aivailable/gossip/tls.py) and the optional plain-HTTP
redirect to the HTTPS API. All serve the same aiohttp application (`runner`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from aivailable import api_tls
from aivailable.api.connections import GuardedSite
from aivailable.config import NodeConfig
from aivailable.errors import ConfigError
from aivailable.gossip import tls

log = logging.getLogger("aivailable.node")


@dataclass
class Listeners:
    port: int
    """The API port (the one asked for, or the one the system chose for port 0)."""
    api_url: str
    redirect: web.AppRunner | None = None


async def open_listeners(runner: web.AppRunner, cfg: NodeConfig, *, host: str, node_id: str, state_dir: Path,
                         cluster_tls: tls.ClusterTLS | None,
                         on_tls_refused: Callable[[str, str], None]) -> Listeners:
    """Listen on the API port, then the cluster port (unless --insecure-cluster), then the redirect port;
    ConfigError naming --port (or the TLS setting) when a port cannot be opened."""
    https = api_tls.server_context(cfg, ca=cluster_tls.ca if cluster_tls else None,
                                   names=api_tls.auto_names(cfg, host), directory=state_dir / "tls", node_id=node_id)
    site = GuardedSite(runner, cfg.host, cfg.port, max_per_client=cfg.max_connections_per_client,
                       header_timeout_s=cfg.header_timeout_s, tls=https)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", param="--port") from None
    out = Listeners(site.port, site.name)
    await _listen_for_peers(runner, cfg, out.port, cluster_tls, on_tls_refused)
    if cfg.tls_redirect_port:
        out.redirect = await api_tls.start_redirect(cfg, out.port, host)
    return out


async def _listen_for_peers(runner: web.AppRunner, cfg: NodeConfig, api_port: int, ctls: tls.ClusterTLS | None,
                            on_tls_refused: Callable[[str, str], None]) -> None:
    """The TLS cluster listener (API port + 1): peers' gossip, model files, key sets and forwarded requests,
    each connection authenticated by a certificate of the cluster's CA."""
    if ctls is None:
        log.warning("--insecure-cluster: traffic between nodes is plain HTTP on port %d (prompts, answers "
                    "and API keys readable on the network); use it only for debugging", api_port)
        return
    port = tls.cluster_port(api_port)
    site = GuardedSite(runner, cfg.host, port, max_per_client=cfg.max_connections_per_client,
                       header_timeout_s=cfg.header_timeout_s, tls=ctls.server_context(), on_tls_refused=on_tls_refused)
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{port}, the cluster port (API port + 1), for TLS "
                          f"between nodes: {exc.strerror}; pick another --port", param="--port") from None
    log.info("cluster traffic over mutual TLS on %s:%d (cluster CA %s…)", cfg.host, port, ctls.ca.fingerprint[:16])

"""HTTPS for clients on the API port: the server certificate, and the optional HTTP -> HTTPS redirect.

The certificate is the operator's (`tls_cert` + `tls_key`: the lab's own CA or a public one) or, with
`tls = "auto"`, one this node issues itself at every start from the cluster CA (aivailable/gossip/tls.py),
which `aivailable ca` prints and every node serves at `GET /api/ca.pem` for clients to trust. Unlike the
cluster port, the API port asks clients for no certificate: API keys authenticate them.

Problems with the operator's files (missing, unreadable, not PEM, key not matching) are `ConfigError`s
naming the setting, raised before the node listens (`aivailable up` exits 2).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import ssl
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aivailable.config import NodeConfig
from aivailable.errors import ConfigError
from aivailable.gossip import tls

log = logging.getLogger("aivailable.node")

AUTO_CERT_FILE = "api.pem"
"""Key + certificate of tls = "auto", in STATE_DIR/tls/ (0600), replaced at every start."""
AUTO_CERT_DAYS = 397
"""Validity of an auto certificate: within what browsers accept of any server certificate (398 days)."""
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}$")


def auto_names(cfg: NodeConfig, advertised_host: str) -> list[str]:
    """What a tls = "auto" certificate names: the advertised address, this machine's host names, the bind
    address if specific, loopback, and `tls_names`."""
    names = [advertised_host, socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    if cfg.host not in ("", "0.0.0.0", "::"):
        names.append(cfg.host)
    return [n for n in dict.fromkeys([*names, *cfg.tls_names]) if n]


def server_context(cfg: NodeConfig, *, ca: tls.ClusterCA | None, names: list[str], directory: Path,
                   node_id: str) -> ssl.SSLContext | None:
    """The API port's TLS context (TLS 1.2 or newer, no client certificate), or None for plain HTTP."""
    if not cfg.https:
        return None
    if cfg.tls == "auto":
        if ca is None:  # config validation refuses tls with insecure_cluster; the CA exists otherwise
            raise ConfigError('tls = "auto" needs the cluster CA (not with insecure_cluster)', param="tls")
        key_pem, cert_pem = tls.issue(ca, f"aivailable node {node_id} API", names=names, days=AUTO_CERT_DAYS,
                                      server=True, client=False)
        path = directory / AUTO_CERT_FILE
        tls.write_private(path, key_pem + cert_pem)
        return _context(path, None)
    cert_path, key_path = Path(cfg.tls_cert).expanduser(), Path(cfg.tls_key).expanduser()
    _check_cert(cert_path)
    _check_key(key_path)
    try:
        return _context(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls_key {key_path} does not belong to the certificate tls_cert {cert_path} "
                          f"({exc.reason or exc})", param="tls_key") from None


def _context(chain: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(chain, key)
    return ctx


def _read(path: Path, param: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{param}: no such file: {path}", param=param) from None
    except OSError as exc:
        raise ConfigError(f"{param}: cannot read {path}: {exc.strerror or exc}", param=param) from None


def _check_cert(path: Path) -> None:
    try:
        certs = x509.load_pem_x509_certificates(_read(path, "tls_cert"))
    except ValueError:
        raise ConfigError(f"tls_cert: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                          param="tls_cert") from None
    ends = certs[0].not_valid_after_utc
    if ends < dt.datetime.now(dt.UTC):
        log.warning("tls_cert %s expired on %s: clients will refuse it; renew it", path, ends.date())


def _check_key(path: Path) -> None:
    try:
        serialization.load_pem_private_key(_read(path, "tls_key"), password=None)
    except TypeError:
        raise ConfigError(f"tls_key: {path} is encrypted with a passphrase; give the key unencrypted (mode 0600)",
                          param="tls_key") from None
    except ValueError:
        raise ConfigError(f"tls_key: {path} holds no PEM private key", param="tls_key") from None


def https_location(host_header: str, fallback_host: str, https_port: int, path_qs: str) -> str:
    """The https URL of a request that reached the redirect port: same host (from its Host header, else
    `fallback_host`), the API port, same path and query."""
    host = host_header.strip()
    if not _HOST_RE.match(host):  # absent, or not a host[:port]: never echo it into a header
        host = fallback_host
    if host.startswith("["):
        host = host[:host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    elif ":" in host:  # a bare IPv6 address
        host = f"[{host}]"
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{host}{port}{path_qs if path_qs.startswith('/') else '/' + path_qs}"


def redirect_app(https_port: int, fallback_host: str) -> web.Application:
    """A plain-HTTP app answering every request with 308 to the same path over HTTPS on `https_port`."""

    async def redirect(request: web.Request) -> web.Response:
        url = https_location(request.headers.get("Host", ""), fallback_host, https_port, request.path_qs)
        return web.Response(status=308, headers={"Location": url}, text=f"this node serves HTTPS: {url}\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


async def start_redirect(cfg: NodeConfig, https_port: int, fallback_host: str) -> web.AppRunner:
    """Listen on `tls_redirect_port` with the redirect app (plain HTTP, behind the same connection guard)."""
    from aivailable.api.connections import GuardedSite

    runner = web.AppRunner(redirect_app(https_port, fallback_host), access_log=None)
    await runner.setup()
    site = GuardedSite(runner, cfg.host, cfg.tls_redirect_port, max_per_client=cfg.max_connections_per_client,
                       header_timeout_s=cfg.header_timeout_s)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"tls_redirect_port: cannot listen on {cfg.host}:{cfg.tls_redirect_port}: {exc.strerror}",
                          param="tls_redirect_port") from None
    log.info("plain HTTP on %s:%d redirects (308) to HTTPS on port %d", cfg.host, cfg.tls_redirect_port, https_port)
    return runner


def view(cfg: NodeConfig, address: str) -> dict:
    """The client API's transport for the status page: scheme, URL, certificate source, redirect port."""
    scheme = "https" if cfg.https else "http"
    source = None if not cfg.https else "cluster CA (tls = auto)" if cfg.tls == "auto" else cfg.tls_cert
    return {"scheme": scheme, "url": f"{scheme}://{address}/", "certificate": source,
            "redirect_port": cfg.tls_redirect_port}

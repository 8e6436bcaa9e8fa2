"""Defences against web pages: CORS preflights, Origin and Host checks, security headers.

A lab user's browser can reach every node, so any page it opens could drive an unkeyed node. The node
therefore:
- answers a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) with `Access-Control-Allow-*`
  only for an origin in `cors_origins` (none by default), and with 403 otherwise;
- refuses (403) a request other than GET/HEAD whose `Origin` is neither its own nor allowed, so a form
  or `fetch(..., {mode: "no-cors"})` from another site does nothing (bodies must also be
  `application/json`: wire/errors.py `check_json_content_type`);
- with `allowed_hosts` set, refuses (403) a `Host` not in it, which stops DNS rebinding (a rebinding page
  always sends its own host name; IP literals and the node's own advertised host are always accepted);
- sends `X-Content-Type-Options`, `X-Frame-Options`, `Referrer-Policy` and a Content-Security-Policy with
  every response (the status page gets its own, with hashes of its inline script and style).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

from aiohttp import web

from aivailable.errors import Forbidden

_SAFE_METHODS = ("GET", "HEAD")
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}


def page_csp(html: str) -> str:
    """A Content-Security-Policy for `html` that allows exactly its inline <script> and <style> blocks
    (by sha256), fetches from its own origin, and nothing else."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks) or "'none'"
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'")


def host_name(host: str) -> str:
    """The name part of a Host header value (no port, no IPv6 brackets), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """The node's CORS, Origin and Host policy (see the module docstring)."""

    def __init__(self, cors_origins: list[str], allowed_hosts: list[str], own_host: str = ""):
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins if o != "*")
        self.hosts = frozenset(host_name(h) for h in allowed_hosts)
        if self.hosts and own_host:
            self.hosts |= {host_name(own_host)}

    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.rstrip("/").lower() in self.origins

    def host_allowed(self, host: str) -> bool:
        if not self.hosts:
            return True
        name = host_name(host)
        return name in self.hosts or _is_ip(name)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Host allow-list, preflights, and cross-origin state-changing requests (see the module)."""
        host = request.headers.get("Host")  # absent (HTTP/1.0): no browser, nothing to rebind
        if host is not None and not request.path.startswith("/_cluster/") and not self.host_allowed(host):
            raise Forbidden(f"Host {host[:100]!r} is not served by this node (allowed_hosts); use one of "
                            f"{', '.join(sorted(self.hosts))} or an IP address.")
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not self.origin_allowed(origin):
                raise Forbidden(f"Cross-origin requests from {origin[:100]!r} are not allowed (cors_origins).")
            headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                       "Access-Control-Max-Age": "600", "Vary": "Origin"}
            asked = request.headers.get("Access-Control-Request-Headers")
            if asked:
                headers["Access-Control-Allow-Headers"] = asked
            return web.Response(status=204, headers=headers)
        same = origin.rstrip("/").lower() == f"{request.scheme}://{request.host}".lower()
        if request.method not in _SAFE_METHODS and not same and not self.origin_allowed(origin):
            raise Forbidden(f"Cross-origin requests from {origin[:100]!r} are not allowed (cors_origins).")
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Security headers on every response; CORS headers for an allowed origin."""
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Content-Security-Policy", API_CSP)
        origin = request.headers.get("Origin")
        if origin is not None and self.origin_allowed(origin) and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

"""Request routing: pick a replica (power of two choices), proxy the bytes, retry before first byte.

A local worker (unix socket) and a remote peer (TCP) are both `Upstream`s; the router never
cares which. Streams pass through unbuffered. A failure before the upstream's first byte moves
the request to another replica; after it, the client gets an OpenAI error event and a clean end.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from aivailable.api.responses import sse
from aivailable.errors import ModelUnavailable, UpstreamError

log = logging.getLogger("aivailable.router")

HOP_HEADER = "X-AIvailable-Hops"
MAX_HOPS = 2
_PASS_HEADERS = ("Content-Type", "Retry-After", "Cache-Control")


@dataclass
class Upstream:
    """One replica reachable over HTTP."""

    key: str
    model: str
    session_fn: Callable[[], aiohttp.ClientSession | None]
    base_url: str
    local: bool
    node_id: str = ""
    slots: int = 1
    """Sequences the replica runs at once (its `parallel`); P2C compares load per slot."""
    outstanding: int = 0
    """Requests this node has in flight to the replica."""
    reported_load: int = 0
    """For a peer's replica: requests it reported in flight or queued (gossiped, ~1 s old)."""
    draining: bool = False
    """The replica's node is leaving (graceful shutdown): used only when no other replica is ready."""
    failures: int = 0
    cooldown_until: float = 0.0
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RouteChoice:
    upstream: Upstream
    candidates: int


def pick(upstreams: list[Upstream], rng: random.Random, exclude: set[str]) -> Upstream | None:
    """Power of two choices on outstanding requests per slot; local wins ties; peers in cooldown last."""
    now = time.monotonic()
    live = [u for u in upstreams if u.key not in exclude]
    if not live:
        return None
    warm = [u for u in live if u.cooldown_until <= now] or live
    if len(warm) == 1:
        return warm[0]
    a, b = rng.sample(warm, 2)
    return min((a, b), key=lambda u: ((u.outstanding + u.reported_load) / max(1, u.slots), not u.local, u.key))


class Proxy:
    """Sends one validated request to a replica and streams the answer back."""

    COOLDOWN_AFTER = 3
    """Consecutive failures before an upstream is put in cooldown."""
    COOLDOWN_S = 5.0

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)
        self.retries = 0

    async def forward(self, request: web.Request, path: str, body: bytes, upstreams: list[Upstream],
                      on_first_byte: Callable[[Upstream], None] | None = None,
                      authorization: str | None = None) -> web.StreamResponse:
        """Proxy to the best replica; raise ModelUnavailable if none could take it."""
        tried: set[str] = set()
        last_error = "no replica is ready"
        retry_after = 2.0
        hops = int(request.headers.get(HOP_HEADER, "0") or 0)
        while True:
            up = pick(upstreams, self.rng, tried)
            if up is None:
                raise ModelUnavailable(f"model is not available right now: {last_error}", retry_after=retry_after)
            tried.add(up.key)
            session = up.session_fn()
            if session is None or session.closed:
                last_error = f"replica {up.key} is restarting"
                continue
            up.outstanding += 1
            headers = {"Content-Type": "application/json", HOP_HEADER: str(hops + 1)}
            if authorization and not up.local:
                headers["Authorization"] = authorization  # peers check the same client keys
            try:
                async with session.post(up.base_url + path, data=body, headers=headers) as r:
                    if r.status in (429, 503) and len(tried) < len(upstreams):
                        last_error = f"replica {up.key} answered {r.status}"
                        retry_after = float(r.headers.get("Retry-After", retry_after))
                        continue  # another replica may have room
                    up.failures = 0
                    if on_first_byte:
                        on_first_byte(up)
                    return await self._relay(request, r, up)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
                self._failed(up, exc)
                last_error = f"replica {up.key} failed ({type(exc).__name__})"
                self.retries += 1
                continue
            finally:
                up.outstanding -= 1

    def _failed(self, up: Upstream, exc: BaseException) -> None:
        up.failures += 1
        if up.failures >= self.COOLDOWN_AFTER:
            up.cooldown_until = time.monotonic() + self.COOLDOWN_S
            log.warning("replica %s failed %d times in a row (%s); cooling down %.0fs", up.key, up.failures,
                        exc, self.COOLDOWN_S)

    async def _relay(self, request: web.Request, r: aiohttp.ClientResponse, up: Upstream) -> web.StreamResponse:
        headers = {h: r.headers[h] for h in _PASS_HEADERS if h in r.headers}
        headers["X-AIvailable-Replica"] = up.key
        is_stream = r.headers.get("Content-Type", "").startswith("text/event-stream")
        if not is_stream:
            data = await r.read()  # a complete JSON body; failure here is before our first byte
            return web.Response(status=r.status, body=data, headers=headers)
        resp = web.StreamResponse(status=r.status, headers=headers)
        await resp.prepare(request)
        try:
            async for chunk in r.content.iter_any():
                await resp.write(chunk)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
            self._failed(up, exc)
            log.warning("replica %s broke mid-stream (%s); ending the client's stream with an error",
                        up.key, type(exc).__name__)
            err = {"error": {"message": f"the replica serving this stream failed ({type(exc).__name__}); "
                                        "retry the request", "type": "server_error", "param": None,
                             "code": "upstream_failed"}}
            await resp.write(sse(err))
        await resp.write_eof()
        return resp


def check_hops(request: web.Request) -> None:
    """Refuse a request that has already bounced between nodes too often (a routing loop)."""
    try:
        hops = int(request.headers.get(HOP_HEADER, "0") or 0)
    except ValueError:
        hops = 0
    if hops >= MAX_HOPS:
        raise UpstreamError(f"request was forwarded {hops} times; refusing to forward again (routing loop?)")


def body_bytes(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


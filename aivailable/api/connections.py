"""Connection limits at the TCP level: a cap per client address and a deadline for a request's headers.

aiohttp closes keep-alive connections that sit idle between requests (`keepalive_timeout_s`, passed to
its AppRunner), but a connection that never completes a first request, or trickles its headers, is
otherwise kept forever, and nothing limits how many sockets one client holds. A few hundred silent
connections then exhaust the node's file descriptors and /health itself stops answering. `GuardedSite`
listens like aiohttp's TCPSite, but each connection goes through a `ConnectionGuard` protocol wrapper
that counts connections per client address (refusing those over the cap by closing them at once) and
closes a connection whose first request head (up to the blank line) has not arrived in time.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("aivailable.api")

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_WARN_EVERY_S = 60.0


class ConnectionGuard:
    """Protocol factory wrapping aiohttp's: per-address cap and first-request header deadline."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], max_per_client: int, header_timeout_s: float):
        self.inner = inner
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.open: Counter[str] = Counter()
        self.refused = 0
        """Connections closed at once because their address was at the cap."""
        self.timed_out = 0
        """Connections closed because their first request's headers did not arrive in time."""
        self._warned: dict[str, float] = {}

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self.inner())

    def admit(self, addr: str) -> bool:
        if self.open[addr] >= self.max_per_client:
            self.refused += 1
            now = time.monotonic()
            if now - self._warned.get(addr, -_WARN_EVERY_S) >= _WARN_EVERY_S:
                self._warned[addr] = now
                log.warning("client %s holds %d connections (max_connections_per_client); closing its new ones "
                            "(%d refused so far, all clients)", addr, self.open[addr], self.refused)
            return False
        self.open[addr] += 1
        return True

    def release(self, addr: str) -> None:
        self.open[addr] -= 1
        if self.open[addr] <= 0:
            del self.open[addr]


class _Guarded(asyncio.Protocol):
    """One connection: delegates everything to aiohttp's protocol once admitted."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard = guard
        self.inner = inner
        self.addr = ""
        self.admitted = False
        self.head = b""
        self.deadline: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.addr = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.guard.admit(self.addr):
            transport.abort()
            return
        self.admitted = True
        self.transport = transport
        self.deadline = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.timed_out += 1
            log.debug("closing a connection from %s: no request headers within %.0f s (header_timeout_s)",
                      self.addr, self.guard.header_timeout_s)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.deadline is not None:
            self.head = (self.head + data)[-(64 << 10):]
            if any(end in self.head for end in _HEAD_ENDS):
                self.deadline.cancel()
                self.deadline = None
                self.head = b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.guard.release(self.addr)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection behind a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_per_client: int,
                 header_timeout_s: float, reuse_address: bool = True, backlog: int = 128):
        super().__init__(runner, backlog=backlog)
        self.host, self.requested_port = host, port
        self.reuse_address = reuse_address
        self.guard: ConnectionGuard | None = None
        self.max_per_client, self.header_timeout_s = max_per_client, header_timeout_s

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        """The port listened on (the requested one until started)."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self.requested_port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.max_per_client, self.header_timeout_s)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self.host, self.requested_port, backlog=self._backlog, reuse_address=self.reuse_address)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (capped at 1M); (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    target = min(target, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft

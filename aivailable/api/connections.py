"""Connection limits at the TCP level: a cap per client address and a deadline for a request's headers.

aiohttp closes keep-alive connections that sit idle between requests (`keepalive_timeout_s`, passed to
its AppRunner), but a connection that never completes a first request, or trickles its headers, is
otherwise kept forever, and nothing limits how many sockets one client holds. A few hundred silent
connections then exhaust the node's file descriptors and /health itself stops answering. `GuardedSite`
listens like aiohttp's TCPSite, but each connection goes through a `ConnectionGuard` protocol wrapper
that counts connections per client address (refusing those over the cap by closing them at once) and
closes a connection whose first request head (up to the blank line) has not arrived in time.

With an SSL context (the cluster listener, aivailable/gossip/tls.py) the wrapper also runs the TLS
handshake itself (`loop.start_tls`) before aiohttp sees the connection, so a refused handshake (a peer
without the cluster's certificate) is counted and reported through `on_tls_refused`, which asyncio's own
TLS servers drop silently; the header deadline covers the handshake too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from aivailable.gossip import tls

log = logging.getLogger("aivailable.api")

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_WARN_EVERY_S = 60.0


class ConnectionGuard:
    """Protocol factory wrapping aiohttp's: per-address cap and first-request header deadline."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], max_per_client: int, header_timeout_s: float,
                 tls: ssl.SSLContext | None = None, on_tls_refused: Callable[[str, str], None] | None = None):
        self.inner = inner
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.tls = tls
        self.on_tls_refused = on_tls_refused
        self.tls_refused = 0
        """TLS handshakes that failed (no certificate, one from another CA, a plaintext client, a timeout)."""
        self.open: Counter[str] = Counter()
        """Connections per address that count against the cap: all of them, less authenticated peers'."""
        self.peers: Counter[str] = Counter()
        """Connections per address whose TLS client certificate was verified (the cluster listener): the
        cluster's own nodes, not capped (an entry node may forward hundreds of streams to one holder)."""
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

    def release(self, addr: str, *, peer: bool = False) -> None:
        counts = self.peers if peer else self.open
        counts[addr] -= 1
        if counts[addr] <= 0:
            del counts[addr]

    def authenticated(self, addr: str) -> None:
        """A connection from `addr` proved a client certificate: it leaves the capped count."""
        self.release(addr)
        self.peers[addr] += 1


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
        self.handshake: asyncio.Future | None = None
        self.upgrade: asyncio.Future | None = None
        self.upgraded = False
        """With TLS: start_tls owns the raw transport (bytes reaching this protocol are decrypted)."""
        self.early_tls = bytearray()
        self.early_plain = bytearray()
        self.started = False
        """aiohttp's protocol has been given the connection (after the TLS handshake, with TLS)."""
        self.peer = False
        """Its TLS client certificate was verified: counted in `guard.peers`, not against the cap."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.addr = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.guard.admit(self.addr):
            transport.abort()
            return
        self.admitted = True
        self.transport = transport
        self.deadline = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._too_slow)
        if self.guard.tls is None:
            self._start(transport)
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        self.handshake = asyncio.ensure_future(self._handshake(transport))  # held: a task needs a reference

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self.started = True
        self.inner.connection_made(transport)
        if self.early_plain:  # request bytes decrypted with the handshake's last flight, before _start ran
            data, self.early_plain = bytes(self.early_plain), bytearray()
            self.data_received(data)

    async def _handshake(self, raw: asyncio.BaseTransport) -> None:
        """TLS on `raw`. Bytes can reach this protocol before `start_tls` takes the transport over (uvloop
        starts reading right after `connection_made`, undoing its pause): they are kept in `early_tls` and
        handed to the TLS protocol once it owns the transport, ahead of anything read later."""
        loop = asyncio.get_running_loop()
        upgrade = self.upgrade = asyncio.ensure_future(loop.start_tls(
            raw, self, self.guard.tls, server_side=True,  # type: ignore[arg-type]
            ssl_handshake_timeout=self.guard.header_timeout_s))
        await asyncio.sleep(0)  # start_tls's synchronous part has run: the TLS protocol now owns `raw`
        self.upgraded = True
        tls_protocol = raw.get_protocol()  # type: ignore[attr-defined]
        if self.early_tls and tls_protocol is not self:
            data, self.early_tls = bytes(self.early_tls), bytearray()
            loop.call_soon(_feed, tls_protocol, data)  # after its connection_made, before any new read
        try:
            secured = await upgrade
        except (OSError, TimeoutError, ConnectionError, asyncio.CancelledError) as exc:
            self.guard.tls_refused += 1
            if self.guard.on_tls_refused is not None and not isinstance(exc, asyncio.CancelledError):
                self.guard.on_tls_refused(self.addr, _handshake_error(exc))
            raw.abort()
            self.connection_lost(None)  # the TLS protocol reports no loss during its handshake: release here
            return
        if secured is None or secured.is_closing():
            self.connection_lost(None)
            return
        self.transport = secured
        if self.guard.tls.verify_mode == ssl.CERT_REQUIRED and secured.get_extra_info("peercert"):
            self.guard.authenticated(self.addr)
            self.peer = True
        self._start(secured)

    def _too_slow(self) -> None:
        self.deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.timed_out += 1
            log.debug("closing a connection from %s: no request headers within %.0f s (header_timeout_s)",
                      self.addr, self.guard.header_timeout_s)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.started:
            if not self.upgraded:  # TLS bytes read before start_tls took the transport over (see _handshake)
                self.early_tls += data
                self.transport.pause_reading()  # type: ignore[union-attr]
            else:
                self.early_plain += data
            return
        if self.deadline is not None:
            self.head = (self.head + data)[-(64 << 10):]
            if any(end in self.head for end in _HEAD_ENDS):
                self.deadline.cancel()
                self.deadline = None
                self.head = b""
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.started else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.guard.release(self.addr, peer=self.peer)
        if self.started:
            self.inner.connection_lost(exc)
        elif not self.upgraded:  # lost before start_tls took the transport: its handshake would never end
            for task in (self.handshake, self.upgrade):
                if task is not None:
                    task.cancel()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver `data` to a protocol as its transport would (TLS protocols are buffered protocols)."""
    if hasattr(protocol, "buffer_updated"):  # uvloop's SSLProtocol is buffered without subclassing BufferedProtocol
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))  # type: ignore[attr-defined]
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


def _handshake_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and (hint := tls.clock_hint(exc.verify_message or "")):
        return f"{exc.verify_message}: {hint}"
    if isinstance(exc, ssl.SSLError):
        why = exc.reason or str(exc)
        if "UNKNOWN_CA" in why or "CERTIFICATE_VERIFY_FAILED" in why:
            return f"{why}: its certificate is not from this cluster's CA (a different cluster secret?)"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in why:
            return f"{why}: no client certificate (not a node of this cluster, or started with --insecure-cluster)"
        if "HTTP_REQUEST" in why or "WRONG_VERSION_NUMBER" in why:
            return f"{why}: plain HTTP sent to the TLS cluster port (a node started with --insecure-cluster?)"
        return why
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the header timeout"
    if isinstance(exc, ConnectionError):
        return ("the peer closed the connection in the TLS handshake: it did not accept this node's certificate "
                "(a node with a different cluster secret, or expecting another node id at this address?)")
    return f"{type(exc).__name__}: {exc}"


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection behind a ConnectionGuard (and TLS with `tls`)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_per_client: int,
                 header_timeout_s: float, reuse_address: bool = True, backlog: int = 128,
                 tls: ssl.SSLContext | None = None, on_tls_refused: Callable[[str, str], None] | None = None):
        super().__init__(runner, backlog=backlog)
        self.host, self.requested_port = host, port
        self.reuse_address = reuse_address
        self.guard: ConnectionGuard | None = None
        self.max_per_client, self.header_timeout_s = max_per_client, header_timeout_s
        self.tls, self.on_tls_refused = tls, on_tls_refused

    @property
    def name(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

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
        self.guard = ConnectionGuard(server, self.max_per_client, self.header_timeout_s, self.tls,
                                     self.on_tls_refused)
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

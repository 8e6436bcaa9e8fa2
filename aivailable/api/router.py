"""Request routing: pick a replica (by prompt prefix, else power of two choices), proxy the bytes, retry
before first byte.

A local worker (unix socket) and a remote peer (TCP) are both `Upstream`s; the router never
cares which. Streams pass through unbuffered. Nothing reaches the client before the upstream's
first body byte (for a stream, its first event), so a replica that fails before then, or whose node
membership declares dead while we wait (a hung machine), costs only a retry on another replica.
A stream that breaks after that goes on from another replica where the request can be continued
(wire/resume.py); otherwise the client gets an OpenAI error event and a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from aivailable.api import hop
from aivailable.api.affinity import affine
from aivailable.errors import ModelUnavailable, UpstreamError
from aivailable.wire.resume import Continuation, Splice, StreamLog, cut_at_failure, failure_event

log = logging.getLogger("aivailable.router")

HOP_HEADER = hop.COUNT_HEADER
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
    alive_fn: Callable[[], bool] | None = None
    """For a peer's replica: is its node still up in membership? Waiting for a first byte stops when not."""
    stats: dict = field(default_factory=dict)
    request_kw: dict = field(default_factory=dict)
    """Extra aiohttp request options for this upstream (a peer's TLS context and expected node name)."""


class ClientGone(Exception):
    """The client of a stream disconnected: nothing is left to relay or resume."""


class UpstreamGone(aiohttp.ClientConnectionError):
    """Membership declared the replica's node dead before its first byte."""


LIVENESS_CHECK_S = 0.25
"""How often a request waiting for a peer's first byte checks that the peer is still alive."""


@dataclass(frozen=True)
class RouteChoice:
    upstream: Upstream
    candidates: int


def pick(upstreams: list[Upstream], rng: random.Random, exclude: set[str], affinity: bytes | None = None,
         counts: dict[str, int] | None = None) -> Upstream | None:
    """With an `affinity` key (api/affinity.py): the first replica in the key's rendezvous order within the
    load bound. Otherwise, or when every replica is past the bound: power of two choices on outstanding
    requests per slot; local wins ties. Peers in cooldown only when nothing else is left. `counts` tallies
    how each choice was made (prefix, overflow, p2c, only)."""
    now = time.monotonic()
    live = [u for u in upstreams if u.key not in exclude]
    if not live:
        return None
    warm = [u for u in live if u.cooldown_until <= now] or live
    up, how = _choose(warm, rng, affinity)
    if counts is not None:
        counts[how] = counts.get(how, 0) + 1
    return up


def _choose(warm: list[Upstream], rng: random.Random, affinity: bytes | None) -> tuple[Upstream, str]:
    if len(warm) == 1:
        return warm[0], "only"
    if affinity is None:
        return _two_choices(warm, rng), "p2c"
    chosen = affine(warm, affinity)
    if chosen is not None:
        return chosen, "prefix"  # type: ignore[return-value]
    return _two_choices(warm, rng), "overflow"


def _two_choices(warm: list[Upstream], rng: random.Random) -> Upstream:
    a, b = rng.sample(warm, 2)
    return min((a, b), key=lambda u: ((u.outstanding + u.reported_load) / max(1, u.slots), not u.local, u.key))


class Proxy:
    """Sends one validated request to a replica and streams the answer back."""

    COOLDOWN_AFTER = 3
    """Consecutive failures before an upstream is put in cooldown."""
    COOLDOWN_S = 5.0

    def __init__(self, seed: int | None = None, hop_auth: Callable[[str], str] | None = None):
        self.rng = random.Random(seed)
        self.hop_auth = hop_auth
        """Signs a request forwarded to a peer (api/hop.py): its client's key was charged here."""
        self.retries = 0
        self.resumed = 0
        """Streams continued on another replica after theirs broke mid-way."""
        self.choices: dict[str, int] = {}
        """How replicas were chosen: prefix (affinity within the load bound), overflow (every replica past
        the bound: two choices), p2c (no affinity key), only (one candidate)."""

    async def forward(self, request: web.Request, path: str, body: bytes, upstreams: list[Upstream],
                      on_first_byte: Callable[[Upstream], None] | None = None,
                      authorization: str | None = None,
                      resume: Continuation | None = None, affinity: bytes | None = None) -> web.StreamResponse:
        """Proxy to the best replica; raise ModelUnavailable if none could take it. With `resume`, a
        stream whose replica breaks after its first token goes on from another replica (wire/resume.py).
        `affinity` (api/affinity.py) keeps a conversation on the replica that holds its prefix; a resumed
        stream goes to the next replica in the same order, where the conversation's next turns will go."""
        tried: set[str] = set()
        r, up, first = await self._open(request, path, body, upstreams, tried, authorization, affinity)
        try:
            if on_first_byte:
                on_first_byte(up)
            headers = {h: r.headers[h] for h in _PASS_HEADERS if h in r.headers}
            headers["X-AIvailable-Replica"] = up.key
            if not _is_stream(r):
                self._close(r, up)
                return web.Response(status=r.status, body=first, headers=headers)
            resp = web.StreamResponse(status=r.status, headers=headers)
            await resp.prepare(request)
        except BaseException:
            self._close(r, up)
            raise
        sent = StreamLog()
        splice: Splice | None = None
        while True:
            try:
                await self._relay(resp, r, first, sent, splice)
                break
            except ClientGone:
                return resp  # nobody to answer; the upstream's answer is dropped with its connection
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
                self._failed(up, exc)
                broken = f"{type(exc).__name__}"
            finally:
                self._close(r, up)
            step = await self._resume(request, path, upstreams, tried, authorization, resume, sent, up, broken,
                                      affinity)
            if step is None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await resp.write(failure_event(f"the replica serving this stream failed ({broken}); "
                                                   "retry the request"))
                break
            r, up, first, splice = step
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _open(self, request: web.Request, path: str, body: bytes, upstreams: list[Upstream],
                    tried: set[str], authorization: str | None,
                    affinity: bytes | None = None) -> tuple[aiohttp.ClientResponse, Upstream, bytes]:
        """The first replica (not in `tried`) that answers, with its first bytes; counted in its `outstanding`
        until `_close`. Raises ModelUnavailable when none does."""
        last_error = "no replica is ready"
        retry_after = 2.0
        hops = hop.of(request).count
        while True:
            up = pick(upstreams, self.rng, tried, affinity, self.choices)
            if up is None:
                raise ModelUnavailable(f"model is not available right now: {last_error}", retry_after=retry_after)
            tried.add(up.key)
            session = up.session_fn()
            if session is None or session.closed:
                last_error = f"replica {up.key} is restarting"
                continue
            up.outstanding += 1
            headers = {"Content-Type": "application/json", HOP_HEADER: str(hops + 1)}
            if not up.local:
                if authorization:
                    headers["Authorization"] = authorization  # peers check the same client keys
                if self.hop_auth is not None:  # only a signed hop counts as forwarded there (api/hop.py)
                    headers[hop.HEADER] = self.hop_auth(path)
            r = None
            try:
                r = await _while_alive(up, session.post(up.base_url + path, data=body, headers=headers, **up.request_kw))
                if r.status in (429, 503) and len(tried) < len(upstreams):
                    last_error = f"replica {up.key} answered {r.status}"
                    retry_after = _retry_after(r.headers.get("Retry-After"), retry_after)
                    self._close(r, up)
                    continue  # another replica may have room
                first = await _while_alive(up, _first_bytes(r))
                up.failures = 0
                return r, up, first
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError) as exc:
                self._close(r, up)
                self._failed(up, exc)
                last_error = f"replica {up.key} failed ({type(exc).__name__})"
                self.retries += 1
                continue
            except BaseException:
                self._close(r, up)
                raise

    @staticmethod
    def _close(r: aiohttp.ClientResponse | None, up: Upstream) -> None:
        """Done with one replica's answer (`r` None: the request never got one). Called once per request."""
        if r is not None:
            r.release()
        up.outstanding -= 1

    async def _resume(self, request: web.Request, path: str, upstreams: list[Upstream], tried: set[str],
                      authorization: str | None, resume: Continuation | None, sent: StreamLog, failed: Upstream,
                      broken: str, affinity: bytes | None = None
                      ) -> tuple[aiohttp.ClientResponse, Upstream, bytes, Splice] | None:
        """Continue a broken stream on another replica, or None (then the client gets an error event)."""
        if resume is None or sent.done:
            log.warning("replica %s broke mid-stream (%s); ending the client's stream with an error",
                        failed.key, broken)
            return None
        done = sent.progress()
        asked = resume.request(done)
        if asked is None:
            log.warning("replica %s broke mid-stream (%s) after the stream had %s; ending the client's stream "
                        "with an error", failed.key, broken, "failed" if done.errored else "finished")
            return None
        body, mute = asked
        try:
            r, up, first = await self._open(request, path, body, upstreams, tried, authorization, affinity)
        except ModelUnavailable as exc:
            log.warning("replica %s broke mid-stream (%s) after %d tokens; no other replica could continue it "
                        "(%s); ending the client's stream with an error", failed.key, broken, done.text_events, exc)
            return None
        if not _is_stream(r) or r.status != 200:
            log.warning("replica %s broke mid-stream (%s); %s refused the continuation with %d", failed.key,
                        broken, up.key, r.status)
            self._close(r, up)
            return None
        self.resumed += 1
        log.warning("replica %s broke mid-stream (%s) after %d tokens; the stream goes on from %s", failed.key,
                    broken, done.text_events, up.key)
        return r, up, first, Splice(resume.kind, done, mute)

    def _failed(self, up: Upstream, exc: BaseException) -> None:
        up.failures += 1
        if up.failures >= self.COOLDOWN_AFTER:
            up.cooldown_until = time.monotonic() + self.COOLDOWN_S
            log.warning("replica %s failed %d times in a row (%s); cooling down %.0fs", up.key, up.failures,
                        exc, self.COOLDOWN_S)

    @staticmethod
    async def _relay(resp: web.StreamResponse, r: aiohttp.ClientResponse, first: bytes, sent: StreamLog,
                     splice: Splice | None) -> None:
        """Send the client a stream's whole events, starting with `first`; raise when the upstream breaks
        (also when it ends without its `[DONE]`)."""
        sent.new_upstream()
        data = first
        while True:
            whole, broke = cut_at_failure(sent.split(data))  # a peer that could not continue it: we may
            if whole:
                if splice is not None:
                    whole = splice.rewrite(whole)
                sent.record(whole)
                try:
                    await resp.write(whole)
                except (ConnectionError, RuntimeError) as exc:  # the client went away (RuntimeError: transport closed)
                    raise ClientGone from exc
            if broke:
                raise aiohttp.ClientPayloadError("the peer's replica broke mid-stream")
            if sent.done:
                return
            data = await r.content.readany()
            if not data:
                raise aiohttp.ClientPayloadError("the replica ended the stream without [DONE]")


def _retry_after(value: str | None, default: float) -> float:
    """An upstream's Retry-After in seconds (0-3600); `default` when absent or not a number (a peer's or
    worker's header is parsed, never trusted to be well-formed)."""
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return min(max(seconds, 0.0), 3600.0) if math.isfinite(seconds) else default


def _is_stream(r: aiohttp.ClientResponse) -> bool:
    return r.headers.get("Content-Type", "").startswith("text/event-stream")


async def _first_bytes(r: aiohttp.ClientResponse) -> bytes:
    """A non-stream answer whole, or a stream's first bytes; an upstream that ends before any is a failure."""
    if not _is_stream(r):
        return await r.read()
    first = await r.content.readany()
    if not first:
        raise aiohttp.ClientPayloadError("the replica closed the stream before its first byte")
    return first


async def _while_alive(up: Upstream, aw):
    """Await `aw`, giving up (UpstreamGone) as soon as membership declares the upstream's node dead."""
    if up.alive_fn is None:
        return await aw
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=LIVENESS_CHECK_S)
            if done:
                return task.result()
            if not up.alive_fn():
                raise UpstreamGone(f"node {up.node_id} was declared dead")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def check_hops(request: web.Request) -> None:
    """Refuse a request that has already bounced between nodes too often (a routing loop); only signed hops
    count (api/hop.py)."""
    hops = hop.of(request).count
    if hops >= MAX_HOPS:
        raise UpstreamError(f"request was forwarded {hops} times; refusing to forward again (routing loop?)")


def body_bytes(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


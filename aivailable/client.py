"""Client-side failover for the official ``openai`` client: the node a client talks to is not a single
point of failure.

Any node answers for every model, and a node whose replica dies continues the stream from another one
(``wire/resume.py``). But a client's TCP connection lives on one node: when *that* node dies (``kill -9``,
a power cut) the connection drops and the plain client loses the answer in flight. Give the client the
node list instead of one URL::

    from aivailable.client import openai_client

    client = openai_client(["10.0.0.5:8000", "10.0.0.6:8000", "10.0.0.7:8000"], api_key=KEY)
    client.chat.completions.create(model="llama-8b", messages=[...], stream=True)

(``async_openai_client`` for ``openai.AsyncOpenAI``; or pass ``FailoverTransport`` /
``AsyncFailoverTransport`` to an HTTP client of your own.) Nodes serving HTTPS (``up --tls auto``) are
given as ``https://host:port`` with ``verify=`` the CA that ``aivailable ca`` printed (a PEM file's path,
or an ``ssl.SSLContext``); it is used for every node, and with it a bare ``host:port`` means HTTPS too (the
API key never goes out in plaintext by omission). When no node can be reached, the error raised is a
certificate one if any node's certificate was not trusted, not whichever node failed last::

    client = openai_client(["https://10.0.0.5:8000", "https://10.0.0.6:8000"], verify="ca.pem", api_key=KEY)

Then:

* A request goes to the node of its URL, or to the next node of the list when that one failed within the
  last ``avoid_s``. A connection that cannot be made, or that drops before the answer's headers, is tried
  on the next node (each node once per request). Every node checks the same API keys.
* The openai client's own retries (``max_retries``: 408/409/429/5xx and timeouts) go to the next node in
  turn: the transport reads the client's retry count (``x-stainless-retry-count``).
* A stream of ``/chat/completions`` or ``/completions`` whose connection drops before its end, or that a
  node ends with ``upstream_failed``, is continued through another node the way nodes continue one among
  themselves: the text so far becomes the continued prompt, or the final assistant message with
  ``continue_final_message``, and the events are rewritten so that the application sees one stream (one
  id, one opening chunk, usage of both parts). At temperature 0 the text is an uninterrupted answer's.
  When no node can continue it, the stream ends with an OpenAI error event (``upstream_failed``), which
  the openai client raises as ``openai.APIError``: never a bare connection error.
* Answers with a status (200, 4xx, 5xx) pass through untouched.

The HTTP library is the one the installed openai client uses (``httpx2``, else ``httpx``).
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aivailable.wire.resume import Continuation, Splice, StreamLog, cut_at_failure, failure_event

try:  # the openai client of 2026 runs on httpx2; older ones on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    try:
        import httpx  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("aivailable.client needs the openai package: pip install 'aivailable[client]'") from None

__all__ = ["AsyncFailoverTransport", "FailoverTransport", "Nodes", "async_openai_client", "openai_client"]

RETRY_HEADER = "x-stainless-retry-count"
AVOID_S = 5.0
"""A node that failed is tried last for this long."""
MAX_RESUMES = 4
"""Continuations of one stream at most (each after a node died under it)."""
FAILOVER_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                   httpx.RemoteProtocolError)
"""Transport errors before an answer's headers that send the request to the next node: the node is down,
or died (its connection dropped) while the request was on its way. A read timeout is the openai client's
to retry (it does, and the retry goes to the next node)."""
_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)  # the openai client's own


Verify = str | os.PathLike[str] | ssl.SSLContext | bool
"""A CA certificate file (PEM), an SSL context, True (the system's CAs) or False (no verification)."""


def tls_context(verify: Verify) -> ssl.SSLContext | bool:
    """What the HTTP transport verifies node certificates with: an SSL context trusting the CA in the PEM
    file `verify`, a context as given, True (the system's CAs) or False (no verification: tests only)."""
    if isinstance(verify, (ssl.SSLContext, bool)):
        return verify
    return ssl.create_default_context(cafile=os.fspath(verify))


def _scheme_for(verify: Verify) -> str:
    """A bare HOST:PORT is https when the caller gave a CA (file or context) to verify nodes with."""
    return "http" if isinstance(verify, bool) else "https"


def _addr(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


@dataclass
class Nodes:
    """The node list and which nodes failed lately. Pure: the clock is passed in."""

    addrs: list[tuple[str, str, int]]
    """(scheme, host, port) of each node, in the order given."""
    avoid_s: float = AVOID_S
    down_until: dict[int, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"failovers": 0, "streams_continued": 0,
                                                            "streams_given_up": 0})
    """Requests sent on to another node after a connection failure; streams continued elsewhere; streams
    that ended with `upstream_failed` because no node continued them."""

    @classmethod
    def parse(cls, nodes: Sequence[str], avoid_s: float = AVOID_S, default_scheme: str = "http") -> Nodes:
        """``host:port`` (``default_scheme``) or ``http(s)://host:port`` each; raises ValueError naming a bad one."""
        addrs = []
        for raw in nodes:
            url = httpx.URL(raw if "://" in raw else f"{default_scheme}://{raw}")
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"bad node address {raw!r}: expected HOST:PORT or http(s)://HOST:PORT")
            addr = _addr(url)
            if addr not in addrs:
                addrs.append(addr)
        if not addrs:
            raise ValueError("give at least one node address")
        return cls(addrs, avoid_s)

    def plan(self, url: httpx.URL, retry: int, now: float) -> list[int]:
        """Node indexes to try for a request to ``url``: its own node (added to the list if new) moved
        ``retry`` places on, then the others in list order; nodes that failed lately go last."""
        own = _addr(url)
        if own not in self.addrs:
            self.addrs.append(own)
        n = len(self.addrs)
        start = self.addrs.index(own) + retry
        order = [(start + k) % n for k in range(n)]
        up = [i for i in order if self.down_until.get(i, 0.0) <= now]
        return up + [i for i in order if i not in up]

    def failed(self, i: int, now: float) -> None:
        self.down_until[i] = now + self.avoid_s

    def ok(self, i: int) -> None:
        self.down_until.pop(i, None)

    def base_url(self) -> str:
        """The OpenAI base URL of the first node."""
        scheme, host, port = self.addrs[0]
        return f"{scheme}://{host}:{port}/v1"

    def retarget(self, request: httpx.Request, i: int) -> httpx.Request:
        """``request`` sent to node ``i`` instead (its body must have been read)."""
        scheme, host, port = self.addrs[i]
        return _with_body(request, request.url.copy_with(scheme=scheme, host=host, port=port), request.content)


class StreamResume:
    """One answer stream as the application receives it, and how to continue it elsewhere (sans-IO)."""

    def __init__(self, continuation: Continuation) -> None:
        self.cont = continuation
        self.log = StreamLog()
        self.splice: Splice | None = None
        self.held = b""
        """An `upstream_failed` event held back while another node is asked to continue."""
        self.resumes = 0

    @classmethod
    def of(cls, request: httpx.Request, response: httpx.Response) -> StreamResume | None:
        """A resumable stream: a 200 server-sent-event answer to a streaming (chat) completion request."""
        path = request.url.path
        kind = "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else ""
        if not kind or request.method != "POST" or response.status_code != 200:
            return None
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return None
        try:
            body = json.loads(request.content)
        except ValueError:
            return None
        if not isinstance(body, dict) or not body.get("stream"):
            return None
        if kind == "chat":
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            limit = body.get("max_tokens", 16)
        return cls(Continuation(kind, body, limit if isinstance(limit, int) else None))

    def take(self, data: bytes) -> tuple[bytes, bool]:
        """Upstream bytes -> the whole events to pass on, and whether the upstream ended this stream with
        `upstream_failed` (held back: another node may continue)."""
        events, failed = cut_at_failure(self.log.split(data))
        if events and self.splice is not None:
            events = self.splice.rewrite(events)
        if events:
            self.log.record(events)
        if failed:
            self.held = failed
        return events, bool(failed)

    @property
    def done(self) -> bool:
        return self.log.done

    def continuation(self, original: httpx.Request) -> tuple[httpx.Request, bool] | None:
        """The request that continues the stream elsewhere and whether it is muted, or None: the stream
        had ended or failed on its own, or was continued MAX_RESUMES times already."""
        self.log.new_upstream()
        if self.log.done or self.resumes >= MAX_RESUMES:
            return None
        asked = self.cont.request(self.log.progress())
        if asked is None:
            return None
        body, mute = asked
        return _with_body(original, original.url, body), mute

    def continued(self, mute: bool) -> None:
        """Another node took the continuation: rewrite its events from now on."""
        self.resumes += 1
        self.held = b""
        self.splice = Splice(self.cont.kind, self.log.progress(), mute)

    def give_up(self, why: str) -> bytes:
        """The end the application gets when no node continued the stream: the held `upstream_failed`
        event, or one saying why."""
        return self.held or failure_event(
            f"the node serving this stream failed ({why}) and no other node could continue it; retry the request")


def _with_body(request: httpx.Request, url: httpx.URL, body: bytes) -> httpx.Request:
    headers = request.headers.copy()
    for name in ("Content-Length", "Transfer-Encoding"):
        headers.pop(name, None)
    headers["Host"] = url.netloc.decode("ascii")
    return httpx.Request(request.method, url, headers=headers, content=body, extensions=request.extensions)


class _Tries:
    """One request's way through the node plan: iterate for the request moved to each node in turn,
    then say how it went (``ok`` returns the node's index)."""

    def __init__(self, nodes: Nodes, clock: Callable[[], float], request: httpx.Request, retry: int,
                 skip: int | None):
        self.nodes, self.clock, self.request = nodes, clock, request
        self.plan = [i for i in nodes.plan(request.url, retry, clock()) if i != skip]
        self.i = -1
        self.last: Exception | None = None

    def __iter__(self) -> Iterator[httpx.Request]:
        for i in self.plan:
            self.i = i
            yield self.nodes.retarget(self.request, i)

    def ok(self) -> int:
        self.nodes.ok(self.i)
        return self.i

    def failed(self, exc: Exception) -> None:
        self.nodes.failed(self.i, self.clock())
        self.nodes.stats["failovers"] += 1
        if self.last is None or not _untrusted(self.last):  # a certificate problem is the one worth telling
            self.last = exc

    def exhausted(self) -> Exception:
        return self.last or httpx.ConnectError("no node to send the request to", request=self.request)


def _untrusted(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _retry_count(request: httpx.Request) -> int:
    try:
        return max(0, int(request.headers.get(RETRY_HEADER, "0")))
    except ValueError:
        return 0


def _ended(exc: BaseException | None) -> str:
    return type(exc).__name__ if exc is not None else "the stream ended without [DONE]"


class _Failover:
    """What the sync and async transports share: the node list, the inner transport, the clock."""

    def __init__(self, nodes: Sequence[str], avoid_s: float, inner: Any, clock: Callable[[], float],
                 default_scheme: str = "http"):
        self.nodes = Nodes.parse(nodes, avoid_s, default_scheme)
        self._inner = inner
        self._clock = clock

    def _answer(self, request: httpx.Request, response: httpx.Response, node: int,
                stream_type: type[_StreamState]) -> httpx.Response:
        """``response`` as is, or, for a resumable stream, with a body that continues it elsewhere."""
        resume = StreamResume.of(request, response)
        if resume is None:
            return response
        body = stream_type(self, request, response, node, resume)
        return httpx.Response(response.status_code, headers=response.headers, stream=body,
                              extensions=response.extensions)


class _StreamState:
    """What the sync and async stream bodies share: where the stream is, and the steps around a break."""

    def __init__(self, t: _Failover, request: httpx.Request, response: httpx.Response, node: int,
                 resume: StreamResume):
        self.t, self.request, self.response, self.node, self.resume = t, request, response, node, resume

    def _broke(self, exc: Exception | None) -> None:
        if exc is not None:
            self.t.nodes.failed(self.node, self.t._clock())

    def _took(self, asked: httpx.Request, response: httpx.Response, node: int, mute: bool) -> bool:
        """Whether ``node``'s answer to the continuation ``asked`` is a stream to go on with (if not, the
        caller closes it)."""
        if StreamResume.of(asked, response) is None:
            return False
        self.response, self.node = response, node
        self.t.nodes.stats["streams_continued"] += 1
        self.resume.continued(mute)
        return True

    def _give_up(self, exc: Exception | None) -> bytes:
        self.t.nodes.stats["streams_given_up"] += 1
        return self.resume.give_up(_ended(exc))


class FailoverTransport(_Failover, httpx.BaseTransport):
    """An httpx transport that fails over between cluster nodes (see the module docstring)."""

    def __init__(self, nodes: Sequence[str], *, avoid_s: float = AVOID_S, verify: Verify = True,
                 transport: httpx.BaseTransport | None = None, clock: Callable[[], float] = time.monotonic):
        inner = transport or httpx.HTTPTransport(limits=_LIMITS, verify=tls_context(verify))
        super().__init__(nodes, avoid_s, inner, clock, _scheme_for(verify))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response, node = self._send(request, _retry_count(request), skip=None)
        return self._answer(request, response, node, _Stream)

    def _send(self, request: httpx.Request, retry: int, skip: int | None) -> tuple[httpx.Response, int]:
        tries = _Tries(self.nodes, self._clock, request, retry, skip)
        for moved in tries:
            try:
                return self._inner.handle_request(moved), tries.ok()
            except FAILOVER_ERRORS as exc:
                tries.failed(exc)
        raise tries.exhausted()

    def close(self) -> None:
        self._inner.close()


class _Stream(_StreamState, httpx.SyncByteStream):
    t: FailoverTransport

    def __iter__(self) -> Iterator[bytes]:
        r = self.resume
        while True:
            broke: Exception | None = None
            try:
                for data in self.response.stream:
                    events, failed = r.take(data)
                    if events:
                        yield events
                    if failed or r.done:
                        break
            except FAILOVER_ERRORS + (httpx.ReadTimeout,) as exc:
                broke = exc
            self.response.close()
            if r.done:
                return
            self._broke(broke)
            if not self._continue():
                yield self._give_up(broke)
                return

    def _continue(self) -> bool:
        asked = self.resume.continuation(self.request)
        if asked is None:
            return False
        request, mute = asked
        try:
            response, node = self.t._send(request, 0, skip=self.node)
        except FAILOVER_ERRORS:
            return False
        if not self._took(request, response, node, mute):
            response.close()
            return False
        return True

    def close(self) -> None:
        self.response.close()


class AsyncFailoverTransport(_Failover, httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`FailoverTransport`."""

    def __init__(self, nodes: Sequence[str], *, avoid_s: float = AVOID_S, verify: Verify = True,
                 transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic):
        inner = transport or httpx.AsyncHTTPTransport(limits=_LIMITS, verify=tls_context(verify))
        super().__init__(nodes, avoid_s, inner, clock, _scheme_for(verify))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response, node = await self._send(request, _retry_count(request), skip=None)
        return self._answer(request, response, node, _AsyncStream)

    async def _send(self, request: httpx.Request, retry: int, skip: int | None) -> tuple[httpx.Response, int]:
        tries = _Tries(self.nodes, self._clock, request, retry, skip)
        for moved in tries:
            try:
                return await self._inner.handle_async_request(moved), tries.ok()
            except FAILOVER_ERRORS as exc:
                tries.failed(exc)
        raise tries.exhausted()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AsyncStream(_StreamState, httpx.AsyncByteStream):
    t: AsyncFailoverTransport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        r = self.resume
        while True:
            broke: Exception | None = None
            try:
                async for data in self.response.stream:
                    events, failed = r.take(data)
                    if events:
                        yield events
                    if failed or r.done:
                        break
            except FAILOVER_ERRORS + (httpx.ReadTimeout,) as exc:
                broke = exc
            await self.response.aclose()
            if r.done:
                return
            self._broke(broke)
            if not await self._continue():
                yield self._give_up(broke)
                return

    async def _continue(self) -> bool:
        asked = self.resume.continuation(self.request)
        if asked is None:
            return False
        request, mute = asked
        try:
            response, node = await self.t._send(request, 0, skip=self.node)
        except FAILOVER_ERRORS:
            return False
        if not self._took(request, response, node, mute):
            await response.aclose()
            return False
        return True

    async def aclose(self) -> None:
        await self.response.aclose()


def openai_client(nodes: Sequence[str], *, avoid_s: float = AVOID_S, verify: Verify = True, **kwargs: Any) -> Any:
    """``openai.OpenAI`` on the first of ``nodes`` (``host:port`` or URLs) that fails over to the others;
    ``verify``: see :func:`tls_context`; ``kwargs`` go to ``openai.OpenAI`` (``api_key``, ``timeout``...)."""
    import openai

    transport = FailoverTransport(nodes, avoid_s=avoid_s, verify=verify)
    kwargs.setdefault("base_url", transport.nodes.base_url())
    return openai.OpenAI(http_client=openai.DefaultHttpxClient(transport=transport), **kwargs)


def async_openai_client(nodes: Sequence[str], *, avoid_s: float = AVOID_S, verify: Verify = True,
                        **kwargs: Any) -> Any:
    """``openai.AsyncOpenAI`` twin of :func:`openai_client`."""
    import openai

    transport = AsyncFailoverTransport(nodes, avoid_s=avoid_s, verify=verify)
    kwargs.setdefault("base_url", transport.nodes.base_url())
    return openai.AsyncOpenAI(http_client=openai.DefaultAsyncHttpxClient(transport=transport), **kwargs)

"""Closed-loop clients for bench/chaos.py: the official openai client, every outcome classified.

A *request* is what an application asks for; it makes up to ``ATTEMPTS`` HTTP *attempts*, the way the
official client retries by default (2 retries on a refused connection, 408/409/429/5xx, honouring
``Retry-After``), except that each retry goes to another node (what any client of a multi-node service
does, e.g. HAProxy's ``option redispatch``), and a node that could not be connected to is avoided for
``AVOID_S``. Nothing that has started streaming is retried. That is the plain official client, the
default. With ``failover``, each request is one call of the official client over every node through
``aivailable.client.FailoverTransport``, with the client's default 2 retries: the transport
sends a request on to the next node when its node cannot be reached, and continues a stream cut by
the death of the node it was connected to through another node.

Every failed attempt gets one class:

- ``refused_before_start``: a clean refusal before any answer byte: an OpenAI-shaped HTTP error
  (4xx/5xx with ``{"error": {...}}``), or a connection that could not be made (refused: the node is
  down; not accepted within the 3-s connect timeout: the node hangs);
- ``broken_mid_stream``: a stream that started and then ended cleanly with an OpenAI error event;
- ``timeout``: no byte for the client's read timeout (a hang);
- ``other``: anything else (an unshaped error body, a stream cut without an error event or a finish
  reason, a malformed answer). The target is 0 of these.

One case no node can make clean: the node the client is connected to is killed (``kill -9``) while the
request is in flight, so the TCP connection just drops. bench/chaos.py counts such a drop as
``refused_before_start`` (no answer byte yet) or ``broken_mid_stream`` (stream started) only when that
node was killed during the attempt (or up to 0.5 s before it), and says so in the detail; any other drop
stays ``other``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import openai

from aivailable.client import FailoverTransport

ATTEMPTS = 3
AVOID_S = 5.0
"""A node that could not be connected to is avoided this long (HAProxy-style: a failed check marks a
server down), unless no other node is left."""
RETRY_AFTER_CAP_S = 2.0
"""Longest the client sleeps on a Retry-After before redispatching (the official client caps at 60 s;
a short cap keeps the loop closed and tight)."""
CLASSES = ("refused_before_start", "broken_mid_stream", "timeout", "other")


@dataclass
class Attempt:
    t0: float
    t1: float
    node: str
    model: str
    stream: bool
    outcome: str  # "ok" or one of CLASSES
    detail: str = ""
    replica: str = ""
    retry: bool = False
    retry_after: float = 0.0
    started: bool = False
    """A stream whose first event arrived before the failure."""


@dataclass
class Request:
    t0: float
    t1: float
    model: str
    stream: bool
    ok: bool
    attempts: list[Attempt] = field(default_factory=list)


class _Failed(Exception):
    def __init__(self, cls: str, detail: str, retry: bool, retry_after: float = 0.0):
        super().__init__(detail)
        self.cls, self.detail, self.retry, self.retry_after = cls, detail, retry, retry_after


def _status_error(e: openai.APIStatusError) -> _Failed:
    shaped = isinstance(e.body, dict) and isinstance(e.body.get("message"), str)  # the client unwraps "error"
    try:
        ra = float(e.response.headers.get("Retry-After", "0") or 0)
    except ValueError:
        ra = 0.0
    if not shaped:
        return _Failed("other", f"HTTP {e.status_code} without an OpenAI error body: {str(e)[:120]}", False)
    retry = e.status_code in (408, 409, 429) or e.status_code >= 500
    return _Failed("refused_before_start", f"HTTP {e.status_code}: {e.message[:120]}", retry, ra)


def _connection_error(e: openai.APIConnectionError, started: bool) -> _Failed:
    root = e.__cause__ or e
    name = type(root).__name__
    if not started and name in ("ConnectError", "ConnectTimeout"):  # nothing was sent: the node is down or hung
        return _Failed("refused_before_start", f"cannot connect ({name}: {root})", True)
    if isinstance(e, openai.APITimeoutError) or "Timeout" in name:
        return _Failed("timeout", f"no byte for the read timeout ({name})", False)
    return _Failed("other", f"{type(root).__name__}: {str(root)[:120]}", not started)


class Clients:
    """``n`` closed-loop client threads over ``nodes`` (name -> base URL) until ``stop()``."""

    def __init__(self, nodes: dict[str, str], models: list[str], n: int, seed: int, timeout_s: float,
                 max_tokens: int, failover: bool = False, healthy: Callable[[], set[str]] | None = None,
                 official_retries: bool = False):
        self.nodes, self.models, self.n = nodes, models, n
        self.failover = failover
        self.healthy = healthy
        self.official_retries = official_retries
        self.timeout_s, self.max_tokens = timeout_s, max_tokens
        self.rng = random.Random(seed)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._down: dict[str, float] = {}  # node -> avoid until (monotonic)
        timeout = openai.Timeout(timeout_s, connect=3.0)
        self.failover_stats: dict[str, int] = {}
        if failover:  # one client over every node; each request enters through a random node's URL
            transport = FailoverTransport(list(nodes.values()))
            self.failover_stats = transport.nodes.stats
            shared = openai.OpenAI(base_url=transport.nodes.base_url(), api_key="chaos", timeout=timeout,
                                   http_client=openai.DefaultHttpxClient(transport=transport))
            self._clients = {k: shared.with_options(base_url=u + "/v1") for k, u in nodes.items()}
        else:  # the official client's own retries (default 2) stay on its one node
            retries = openai.DEFAULT_MAX_RETRIES if official_retries else 0
            self._clients = {k: openai.OpenAI(base_url=u + "/v1", api_key="chaos", max_retries=retries,
                                              timeout=timeout) for k, u in nodes.items()}
        self._threads = [threading.Thread(target=self._loop, args=(i, random.Random(self.rng.random())),
                                          daemon=True, name=f"client{i}") for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, join_s: float) -> list[str]:
        """Stop and join; returns the names of threads still running (hung past every timeout)."""
        self._stop.set()
        deadline = time.monotonic() + join_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _loop(self, i: int, rng: random.Random) -> None:
        stream = i % 2 == 1  # half the clients stream
        while not self._stop.is_set():
            model = rng.choice(self.models)
            req = self.one(model, stream, rng)
            with self._lock:
                self.requests.append(req)

    def one(self, model: str, stream: bool, rng: random.Random) -> Request:
        t0 = time.monotonic()
        tried: list[str] = []
        attempts: list[Attempt] = []
        for _ in range(1 if self.failover or self.official_retries else ATTEMPTS):
            now = time.monotonic()
            fresh = [k for k in self.nodes if k not in tried]
            if self.healthy is not None:  # a load balancer: only nodes whose last health check passed
                checked = self.healthy()
                up = [k for k in fresh if k in checked] or [k for k in self.nodes if k in checked]
            else:
                up = [k for k in fresh if self._down.get(k, 0.0) <= now]
            node = rng.choice(up or fresh or list(self.nodes))
            tried.append(node)
            a = self._attempt(node, model, stream)
            attempts.append(a)
            if a.detail.startswith("cannot connect"):
                self._down[node] = time.monotonic() + AVOID_S
            if a.outcome == "ok" or not a.retry:
                break
            if a.retry_after:
                time.sleep(min(RETRY_AFTER_CAP_S, a.retry_after))
        return Request(t0, time.monotonic(), model, stream, attempts[-1].outcome == "ok", attempts)

    def _attempt(self, node: str, model: str, stream: bool) -> Attempt:
        client = self._clients[node]
        t0 = time.monotonic()
        started = False
        replica = ""
        try:
            msgs = [{"role": "user", "content": "Name a colour."}]
            if not stream:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=msgs, max_tokens=self.max_tokens)
                replica = raw.headers.get("X-AIvailable-Replica", "")
                r = raw.parse()
                if not r.choices or r.choices[0].finish_reason not in ("stop", "length"):
                    raise _Failed("other", f"answer without a finish reason: {str(r)[:120]}", False)
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=msgs, max_tokens=self.max_tokens, stream=True)
                replica = raw.headers.get("X-AIvailable-Replica", "")
                finish = None
                try:
                    for c in raw.parse():
                        started = True
                        if c.choices and c.choices[0].finish_reason:
                            finish = c.choices[0].finish_reason
                except openai.APIError as e:
                    if isinstance(e, openai.APIConnectionError):
                        raise
                    raise _Failed("broken_mid_stream", f"error event: {e.message[:120]}", False) from None
                if finish not in ("stop", "length"):
                    raise _Failed("other", "stream ended without a finish reason or an error event", False)
        except _Failed as f:
            return self._failed(t0, node, model, stream, f, replica, started)
        except openai.APIStatusError as e:
            return self._failed(t0, node, model, stream, _status_error(e), replica, started)
        except openai.APIConnectionError as e:
            f = _connection_error(e, started)
        except Exception as e:  # noqa: BLE001 - e.g. the HTTP library's own error from inside a stream
            cls = "timeout" if "Timeout" in type(e).__name__ else "other"
            f = _Failed(cls, f"{type(e).__name__}: {str(e)[:120]}", not started)
        else:
            return Attempt(t0, time.monotonic(), node, model, stream, "ok", replica=replica)
        return self._failed(t0, node, model, stream, f, replica, started)

    @staticmethod
    def _failed(t0: float, node: str, model: str, stream: bool, f: _Failed, replica: str,
                started: bool = False) -> Attempt:
        return Attempt(t0, time.monotonic(), node, model, stream, f.cls, f.detail, replica, f.retry, f.retry_after,
                       started)

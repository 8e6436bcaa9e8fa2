"""A lean closed-loop HTTP/1.1 load generator, run in a process of its own so it is not the bottleneck.

Each of `concurrency` kept-alive connections sends the same pre-built POST again as soon as the previous answer
has ended (a closed loop), until `requests` answers in all. The client is a bare asyncio ``Protocol``: the
request bytes are built once, an answer is parsed only as far as needed to know where it ends (status line,
``Content-Length``, or the chunked terminator), so one request costs the generator a few tens of microseconds
of CPU (``fixed`` mode below measures it). Per request it records the latency (request written -> whole answer
read) and the time to the first body byte; an answer that is not 200, or a stream that does not end with
``data: [DONE]``, counts as an error (the first few are kept verbatim).

    python -m bench.loadgen run --url http://127.0.0.1:8000/v1/chat/completions --body '{...}' \
        --concurrency 16 --requests 2000 [--warmup 50]      # prints one JSON object
    python -m bench.loadgen fixed --port 0                   # a server answering a fixed 200 at once

``fixed`` is the generator's own yardstick: a trivial server (same kind of Protocol, no parsing beyond the
request's end) that answers a small JSON body at once; the generator against it gives the floor of what
it can measure (latency and requests/s of generator + kernel loopback + a near-free server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from urllib.parse import urlsplit

from bench import harness

CHUNKED_END = b"\r\n0\r\n\r\n"


def build_request(host: str, path: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 POST with a keep-alive connection and a JSON body."""
    hdrs = {"Host": host, "Content-Type": "application/json", "Content-Length": str(len(body)),
            "Connection": "keep-alive", **(extra or {})}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + body


class Answer:
    """Incremental parse of one HTTP/1.1 response: just enough to know its status and where it ends."""

    __slots__ = ("buf", "status", "body_at", "length", "chunked", "first_body")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.body_at = -1
        self.length = -1
        self.chunked = False
        self.first_body = 0.0

    def feed(self, data: bytes, now: float) -> bool:
        """Add bytes; True once the answer is complete."""
        self.buf += data
        if self.body_at < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    self.length = int(v)
                elif k == "transfer-encoding" and "chunked" in v.lower():
                    self.chunked = True
            self.body_at = end + 4
        if not self.first_body and len(self.buf) > self.body_at:
            self.first_body = now
        if self.chunked:
            return self.buf.endswith(CHUNKED_END) or (len(self.buf) == self.body_at + 5
                                                      and self.buf.endswith(b"0\r\n\r\n"))
        return self.length >= 0 and len(self.buf) - self.body_at >= self.length

    def body(self) -> bytes:
        return bytes(self.buf[self.body_at:])


class Conn(asyncio.Protocol):
    """One kept-alive connection; `send` resolves with (latency_s, first_body_s, Answer)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.done: asyncio.Future | None = None
        self.t0 = 0.0
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed mid-answer ({exc})"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        ans = self.answer
        if ans is None or self.done is None:
            return
        if ans.feed(data, now) and not self.done.done():
            self.done.set_result((now - self.t0, (ans.first_body or now) - self.t0, ans))

    def send(self, req: bytes) -> asyncio.Future:
        self.answer = Answer()
        self.done = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(req)  # type: ignore[union-attr]
        return self.done


async def connect(url: str) -> Conn:
    loop = asyncio.get_running_loop()
    u = urlsplit(url)
    if u.scheme == "unix":  # unix:///path/to.sock/v1/... is not parseable; use --unix instead
        raise ValueError("use --unix PATH with an http:// URL for a unix socket")
    _, proto = await loop.create_connection(Conn, u.hostname, u.port or 80)
    return proto


async def connect_unix(path: str) -> Conn:
    _, proto = await asyncio.get_running_loop().create_unix_connection(Conn, path)
    return proto


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (0-100), linear interpolation (bench/harness.py); NaN for no values."""
    v = harness.pct(xs, q)
    return float("nan") if v is None else v


def stats_ms(xs: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": round(pct(ms, 50), 4), "p90": round(pct(ms, 90), 4),
            "p99": round(pct(ms, 99), 4), "mean": round(sum(ms) / len(ms), 4), "max": round(max(ms), 4)}


async def run(url: str, body: bytes, concurrency: int, requests: int, warmup: int, timeout: float,
              unix: str | None = None, stream: bool = False, headers: dict[str, str] | None = None) -> dict:
    """Closed loop over `concurrency` connections; `requests` measured answers after `warmup` per connection."""
    u = urlsplit(url)
    req = build_request(u.netloc, u.path or "/", body, headers)
    async def dial() -> Conn:
        return await (connect_unix(unix) if unix else connect(url))

    conns = [await dial() for _ in range(concurrency)]
    lat: list[float] = []
    first: list[float] = []
    errors: list[str] = []
    n_err = reconnects = 0
    remaining = requests

    async def one(i: int) -> tuple[float, float] | None:
        nonlocal n_err, reconnects
        for attempt in (0, 1):
            c = conns[i]
            if c.lost.done() or c.transport is None or c.transport.is_closing():
                # The server closed the kept-alive connection while it was idle (uvicorn does after 5 s):
                # a new one, not counted as a sample's time.
                conns[i] = c = await dial()
                reconnects += 1
            try:
                total, fb, ans = await asyncio.wait_for(c.send(req), timeout)
                break
            except ConnectionError:
                if attempt or (c.answer is not None and c.answer.buf):
                    raise  # closed mid-answer, or twice in a row: a real failure
                c.transport.close()  # type: ignore[union-attr]
        ok = ans.status == 200 and (not stream or b"data: [DONE]" in ans.body()[-64:])
        if not ok:
            n_err += 1
            if len(errors) < 5:
                errors.append(f"HTTP {ans.status}: {ans.body()[:300]!r}")
            return None
        return total, fb

    async def loop(i: int) -> None:
        nonlocal remaining
        for _ in range(warmup):
            await one(i)
        await barrier.wait()
        while remaining > 0:
            remaining -= 1
            r = await one(i)
            if r is not None:
                lat.append(r[0])
                first.append(r[1])

    barrier = _Barrier(concurrency)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_start = time.perf_counter()
    try:
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    wall = time.perf_counter() - barrier.released_at
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    done = len(lat) + n_err
    return {"concurrency": concurrency, "requests": done, "ok": len(lat), "errors": n_err, "reconnects": reconnects,
            "error_samples": errors, "wall_s": round(wall, 4), "rps": round(len(lat) / wall, 2) if wall else 0.0,
            "latency_ms": stats_ms(lat), "first_byte_ms": stats_ms(first),
            "generator_cpu_ms_per_request": round(cpu * 1000 / max(1, done + warmup * concurrency), 4),
            "generator_cpu_s": round(cpu, 3), "total_s": round(time.perf_counter() - t_start, 3),
            "raw_ms": [round(x * 1000, 4) for x in lat]}


class _Barrier:
    """All connections finish their warm-up before the measured part starts (asyncio has no Barrier in 3.11)."""

    def __init__(self, n: int):
        self.n, self.event, self.released_at = n, asyncio.Event(), 0.0

    async def wait(self) -> None:
        self.n -= 1
        if self.n <= 0:
            self.released_at = time.perf_counter()
            self.event.set()
        await self.event.wait()


# -- the yardstick: a server that answers at once ---------------------------------------------------------
FIXED_BODY = b'{"id":"fixed","object":"chat.completion","choices":[]}'
FIXED_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(FIXED_BODY)).encode() + b"\r\n\r\n" + FIXED_BODY)


class Fixed(asyncio.Protocol):
    """Answers each complete request (headers + Content-Length body) with FIXED_ANSWER."""

    def connection_made(self, transport) -> None:
        self.transport, self.buf = transport, bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self.buf[:end]).split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            self.transport.write(FIXED_ANSWER)


async def serve_fixed(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Fixed, host, port)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()}), flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure; print one JSON object on stdout")
    r.add_argument("--url", required=True, help="http://HOST:PORT/PATH (with --unix: only PATH counts)")
    r.add_argument("--unix", help="connect to this unix socket instead of HOST:PORT")
    r.add_argument("--body", required=True, help="the JSON body to POST")
    r.add_argument("--concurrency", type=int, default=1)
    r.add_argument("--requests", type=int, default=1000, help="measured answers in all")
    r.add_argument("--warmup", type=int, default=10, help="unmeasured answers per connection first")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds one answer may take")
    r.add_argument("--header", action="append", default=[], help="extra 'Name: value' header")
    f = sub.add_parser("fixed", help="serve a fixed 200 answer (the generator's yardstick)")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "fixed":
        asyncio.run(serve_fixed(args.host, args.port))
        return 0
    if args.concurrency < 1 or args.requests < 1:
        ap.error("--concurrency and --requests must be >= 1")
    try:
        body = json.loads(args.body)
    except ValueError as exc:
        ap.error(f"--body is not JSON: {exc}")
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    out = asyncio.run(run(args.url, args.body.encode(), args.concurrency, args.requests, args.warmup,
                          args.timeout, unix=args.unix, stream=bool(body.get("stream")), headers=headers))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

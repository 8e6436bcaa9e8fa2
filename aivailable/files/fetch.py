"""The asyncio side of a peer transfer: signed chunk requests, bandwidth limit, resumable writes.

`Fetcher.fetch(transfer, peers)` drives a `plan.TransferPlan`: it asks holders for the manifest, then
for chunks (each checked against the manifest), writes them at their offset into
`fetched/<sha256>.partial`, fsyncs, and records the done-chunk bitmap in `<sha256>.parts`. After a crash
or restart the same call resumes from that bitmap; a dead peer's chunks go to another holder. When every
chunk is in, the whole file must hash to the catalog's sha256; only then is it renamed (atomically) to
`fetched/<sha256>.gguf`. A file that fails this check is deleted and never loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from aivailable.files import progress
from aivailable.files.index import sha256_file
from aivailable.files.plan import PeerState, PlanConfig, TransferPlan, from_bitmap
from aivailable.files.serve import FILES_PATH
from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest
from aivailable.gossip.peerhttp import PeerDialer
from aivailable.names import inside, is_sha256

log = logging.getLogger("aivailable.files")

READ_PIECE = 64 << 10


class TransferFailed(Exception):
    """A transfer that cannot complete; the message says why, for the status page."""


class TokenBucket:
    """Bandwidth limit (sans-IO): `delay(n, now)` = seconds to wait before `n` more bytes may pass."""

    def __init__(self, rate_bps: float, burst: float | None = None):
        self.rate = rate_bps
        self.burst = burst if burst is not None else max(rate_bps / 4, READ_PIECE)
        self.tokens = self.burst
        self.at: float | None = None

    def delay(self, n: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass
class Transfer:
    """One file being fetched, as the status page shows it."""

    model: str
    sha256: str
    size: int
    state: str = "queued"
    """queued, fetching, verifying, done or failed"""
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str = ""
    peers: dict[str, int] = field(default_factory=dict)
    """bytes received from each holder"""
    banned: dict[str, str] = field(default_factory=dict)
    resumed_bytes: int = 0
    _samples: list[tuple[float, int]] = field(default_factory=list)

    def note(self, now: float) -> None:
        self._samples.append((now, self.bytes_done))
        self._samples = [s for s in self._samples if now - s[0] <= 5.0][-64:]

    def rate_bps(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def view(self) -> dict:
        rate = self.rate_bps() if self.state == "fetching" else 0.0
        left = max(0, self.size - self.bytes_done)
        return {"model": self.model, "sha256": self.sha256, "state": self.state, "size": self.size,
                "bytes_done": self.bytes_done,
                "percent": round(100.0 * self.bytes_done / self.size, 1) if self.size
                else (100.0 if self.state == "done" else 0.0),
                "rate_mib_s": round(rate / 2**20, 2), "eta_s": round(left / rate, 1) if rate > 0 else None,
                "peers": dict(self.peers), "banned": dict(self.banned), "error": self.error,
                "resumed_bytes": self.resumed_bytes,
                "elapsed_s": round((self.finished or time.monotonic()) - self.started, 1)}


@dataclass
class FetchCounters:
    """Callbacks into the node's /metrics (bytes by peer, corrupt chunks by peer)."""

    received: Callable[[str, int], None] = lambda peer, n: None
    corrupt: Callable[[str], None] = lambda peer: None


class Fetcher:
    """Fetches files into `fetched_dir` from peers over signed `POST /_cluster/files` requests."""

    def __init__(self, *, node_id: str, secret: bytes, fetched_dir: Path, chunk_size: int,
                 bandwidth_bps: float = 0.0, plan_config: PlanConfig | None = None,
                 counters: FetchCounters | None = None, seed: int | None = None,
                 read_timeout_s: float = 30.0, dialer: PeerDialer | None = None):
        self.node_id, self.secret, self.dir = node_id, secret, fetched_dir
        self.dialer = dialer or PeerDialer()
        self.chunk_size = chunk_size
        self.bucket = TokenBucket(bandwidth_bps)
        self.plan_config = plan_config or PlanConfig()
        self.counters = counters or FetchCounters()
        self.rng = random.Random(seed)
        self.bad_peers: dict[str, str] = {}
        """Holders that served corrupt data, with why: not asked again by any transfer of this node."""
        # No total timeout: a bandwidth-limited chunk may take minutes. A holder silent for
        # `read_timeout_s` (hung, partitioned) fails the request and its chunk goes to another holder.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def paths(self, sha256: str) -> tuple[Path, Path, Path]:
        """(final, partial, parts-bitmap) paths of a file, each resolved inside the fetched folder;
        TransferFailed for anything but a sha256 (64 lowercase hex) or a path that would leave the folder
        (e.g. through a symlink planted there)."""
        if not is_sha256(sha256):
            raise TransferFailed(f"refusing to fetch {sha256[:80]!r}: not a sha256 (64 lowercase hex digits)")
        try:
            return tuple(inside(self.dir, self.dir / f"{sha256}{ext}")  # type: ignore[return-value]
                         for ext in (".gguf", ".partial", ".parts"))
        except ValueError as exc:
            raise TransferFailed(f"refusing to write outside the models folder: {exc}") from None

    # -- requests ------------------------------------------------------------------------------------
    def _sealed(self, sha256: str, chunk: int, chunk_size: int) -> bytes:
        msg = FileRequest(sha256=sha256, chunk_size=chunk_size, chunk=chunk)
        return envelope.seal(msg, self.secret, self.node_id, time.time(), os.urandom(12))

    async def _manifest(self, node: str, addr: str, sha256: str) -> dict:
        async with self._sess().post(self.dialer.url(addr, FILES_PATH), data=self._sealed(sha256, -1, self.chunk_size),
                                     **self.dialer.options(node)) as r:
            if r.status != 200:
                raise TransferFailed(f"manifest: HTTP {r.status} {(await r.text())[:200]}")
            return await r.json()

    async def _chunk(self, node: str, addr: str, sha256: str, i: int, chunk_size: int, limit: int) -> bytes:
        buf = bytearray()
        async with self._sess().post(self.dialer.url(addr, FILES_PATH), data=self._sealed(sha256, i, chunk_size),
                                     **self.dialer.options(node)) as r:
            if r.status != 200:
                raise TransferFailed(f"HTTP {r.status} {(await r.text())[:200]}")
            async for piece in r.content.iter_chunked(READ_PIECE):
                buf += piece
                if len(buf) > limit:
                    break  # longer than the chunk: the plan rejects it by its length
                wait = self.bucket.delay(len(piece), time.monotonic())
                if wait > 0:
                    await asyncio.sleep(wait)
        return bytes(buf)

    # -- one transfer --------------------------------------------------------------------------------
    async def fetch(self, t: Transfer, peers: Callable[[], dict[str, str]]) -> Path:
        """Fetch `t.sha256` from the holders `peers()` returns ({node id: address}, asked again while it
        runs); return the verified file's path or raise TransferFailed."""
        final, partial, parts = self.paths(t.sha256)
        if final.exists():
            t.state, t.bytes_done = "done", t.size
            return final
        t.state = "fetching"
        plan = await self._open_plan(t, peers, partial, parts)
        t.bytes_done = t.resumed_bytes = plan.bytes_done()
        if t.resumed_bytes:
            log.info("resuming %s (%s) at %.1f of %.1f MiB from its chunk bitmap", t.model, t.sha256[:12],
                     t.resumed_bytes / 2**20, t.size / 2**20)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, t.size)
            with progress.bar(f"fetch {t.model}", t.size) as advance:
                advance(t.bytes_done)
                await self._run(t, plan, peers, fd, parts, advance)
            os.fsync(fd)
        finally:
            os.close(fd)
        t.state = "verifying"
        log.info("verifying %s: sha256 of the whole file", t.model)
        with progress.bar(f"verify {t.model}", t.size) as advance:
            digest = await asyncio.to_thread(sha256_file, partial, advance)
        if digest != t.sha256:
            partial.unlink(missing_ok=True)
            parts.unlink(missing_ok=True)
            raise TransferFailed(f"whole file hashes to {digest[:12]}…, expected {t.sha256[:12]}…; deleted "
                                 f"(chunks came from {', '.join(sorted(t.peers)) or 'nobody'})")
        os.replace(partial, final)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        parts.unlink(missing_ok=True)
        t.state, t.finished = "done", time.monotonic()
        return final

    async def _open_plan(self, t: Transfer, peers: Callable[[], dict[str, str]], partial: Path,
                         parts: Path) -> TransferPlan:
        """The plan, resumed from the parts file when it matches; else from a fresh manifest."""
        saved = None
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(parts.read_text())
        if saved and saved.get("sha256") == t.sha256 and (not t.size or saved.get("size") == t.size) \
                and partial.exists():
            t.size = int(saved["size"])
            hashes, cs = saved["chunks"], int(saved["chunk_size"])
            have = from_bitmap(bytes.fromhex(saved["bitmap"]), len(hashes))
        else:
            m = await self._first_manifest(t, peers)
            hashes, cs, have = m["chunks"], int(m["chunk_size"]), set()
            t.size = int(m["size"])
            partial.unlink(missing_ok=True)
        try:
            plan = TransferPlan(hashes, cs, t.size, self.plan_config, random.Random(self.rng.random()), have)
        except ValueError as exc:
            parts.unlink(missing_ok=True)
            raise TransferFailed(f"bad manifest: {exc}") from None
        for p, why in self.bad_peers.items():
            plan.peers[p] = PeerState(banned=why, present=False)
        self._save(parts, t, plan)
        return plan

    async def _first_manifest(self, t: Transfer, peers: Callable[[], dict[str, str]]) -> dict:
        deadline = time.monotonic() + self.plan_config.give_up_after_s
        errors: dict[str, str] = {}
        while time.monotonic() < deadline:
            for node, addr in sorted(peers().items()):
                if node in self.bad_peers:
                    continue
                try:
                    m = await self._manifest(node, addr, t.sha256)
                except (aiohttp.ClientError, TimeoutError, OSError, TransferFailed, ValueError) as exc:
                    errors[node] = str(exc) or type(exc).__name__
                    continue
                if (t.size and m.get("size") != t.size) or m.get("sha256") != t.sha256 or not isinstance(m.get("chunks"), list):
                    errors[node] = f"manifest does not describe {t.sha256[:12]} of {t.size} bytes"
                    continue
                return m
            await asyncio.sleep(1.0)
        tried = "; ".join(f"{n}: {e}" for n, e in sorted(errors.items())) or "no live node holds it"
        raise TransferFailed(f"no holder answered with a manifest ({tried})")

    def _save(self, parts: Path, t: Transfer, plan: TransferPlan) -> None:
        tmp = parts.with_suffix(".parts-tmp")
        tmp.write_text(json.dumps({"sha256": t.sha256, "size": t.size, "chunk_size": plan.chunk_size,
                                   "chunks": plan.chunk_hashes, "bitmap": plan.bitmap().hex()}))
        os.replace(tmp, parts)

    async def _run(self, t: Transfer, plan: TransferPlan, peers: Callable[[], dict[str, str]], fd: int,
                   parts: Path, advance: progress.Advance) -> None:
        tasks: dict[asyncio.Task, tuple[int, str]] = {}
        try:
            while not plan.done:
                now = time.monotonic()
                addrs = peers()
                plan.set_peers([p for p in addrs if p not in self.bad_peers], now)
                for i, peer in plan.next_requests(now):
                    task = asyncio.create_task(self._chunk(peer, addrs[peer], t.sha256, i, plan.chunk_size,
                                                           plan.chunk_len(i)))
                    tasks[task] = (i, peer)
                self._report(t, plan)
                if plan.failed:
                    raise TransferFailed(plan.error)
                if not tasks:
                    await asyncio.sleep(0.25)
                    continue
                done, _ = await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i, peer = tasks.pop(task)
                    await self._landed(t, plan, task, i, peer, fd, parts, advance)
                t.note(time.monotonic())
            self._report(t, plan)
        finally:
            for task in tasks:
                task.cancel()

    async def _landed(self, t: Transfer, plan: TransferPlan, task: asyncio.Task, i: int, peer: str, fd: int,
                      parts: Path, advance: progress.Advance) -> None:
        now = time.monotonic()
        try:
            data = task.result()
        except (aiohttp.ClientError, TimeoutError, OSError, TransferFailed) as exc:
            plan.on_error(i, peer, str(exc) or type(exc).__name__, now)
            return
        self.counters.received(peer, len(data))
        if not plan.on_data(i, peer, hashlib.sha256(data).hexdigest(), len(data), now):
            return
        await asyncio.to_thread(_write_at, fd, data, i * plan.chunk_size)
        self._save(parts, t, plan)
        t.bytes_done += len(data)
        t.peers[peer] = t.peers.get(peer, 0) + len(data)
        advance(len(data))

    def _report(self, t: Transfer, plan: TransferPlan) -> None:
        for ev in plan.drain_events():
            if ev.kind == "corrupt":
                self.bad_peers[ev.peer] = plan.peers[ev.peer].banned
                t.banned[ev.peer] = plan.peers[ev.peer].banned
                self.counters.corrupt(ev.peer)
                log.error("model file %s (%s): peer %s served corrupt data; %s. Not asking it again; check "
                          "that node's disk and copy of the file", t.model, t.sha256[:12], ev.peer, ev.text)
            else:
                log.warning("model file %s: %s", t.model, ev.text)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    os.fsync(fd)


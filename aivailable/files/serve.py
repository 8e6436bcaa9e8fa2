"""The holder's side of peer transfers: `POST /_cluster/files` answers a signed `FileRequest`.

The request is a signed envelope (HMAC with the cluster secret, timestamp window, nonce replay cache:
`gossip/envelope.py`); anything else gets 400/401 and no byte of any file. The answer is the manifest
(JSON: size, chunk size, sha256 of every chunk; computed once per chunk size and cached) or one chunk's
raw bytes; the requester verifies them, so a response needs no signature of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest
from aivailable.gossip.signed import Refused, open_signed
from aivailable.names import is_sha256

log = logging.getLogger("aivailable.files")

FILES_PATH = "/_cluster/files"
MAX_REQUEST_BYTES = 4096
READ_TIMEOUT_S = 10.0  # a signed file request is a few hundred bytes
MIN_CHUNK = 64 << 10
MAX_CHUNK = 256 << 20
FAULT_CORRUPT_ENV = "AIVAILABLE_FAULT_CORRUPT_CHUNKS"
"""Fault-injection hook for tests ONLY: when this variable is "1" in a node's environment, every chunk
that node serves has its first byte flipped (its manifest stays honest), so peers must detect it."""


def manifest(path: Path, sha256: str, chunk_size: int) -> dict:
    """{sha256, size, chunk_size, chunks: [sha256 of each chunk]} of a file (blocking)."""
    size = path.stat().st_size
    chunks = []
    with path.open("rb") as f:
        while True:
            data = f.read(chunk_size)
            chunks.append(hashlib.sha256(data).hexdigest())
            if len(data) < chunk_size:
                break
    if size and size % chunk_size == 0:
        chunks.pop()  # the empty read after the last full chunk
    return {"sha256": sha256, "size": size, "chunk_size": chunk_size, "chunks": chunks}


def read_chunk(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


class FileServer:
    """Serves manifests and chunks of the files `lookup(sha256)` finds on this node."""

    def __init__(self, node_id: str, secret: bytes, lookup: Callable[[str], Path | None], cache: Any,
                 on_served: Callable[[int], None] = lambda n: None):
        self.node_id, self.secret, self.lookup, self.cache = node_id, secret, lookup, cache
        self.on_served = on_served
        self._replay = envelope.ReplayCache()
        self.on_rejected: Callable[[str], None] | None = None  # the node counts refusals with gossip's
        self._logged: dict[str, float] = {}
        self.rejected = 0
        self.corrupt = os.environ.get(FAULT_CORRUPT_ENV) == "1"
        if self.corrupt:
            log.warning("FAULT INJECTION: %s=1, this node serves corrupted chunks (tests only)", FAULT_CORRUPT_ENV)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "unknown"
        try:
            src, msg = await open_signed(request, self.secret, self._replay, own_id=self.node_id,
                                         max_bytes=MAX_REQUEST_BYTES, timeout_s=READ_TIMEOUT_S)
        except Refused as r:
            return r.answer(request, self._reject(peer, r.reason, r.detail))
        if not isinstance(msg, FileRequest):
            return self._reject(peer, "malformed", f"a {type(msg).__name__} is not a file request")
        if not is_sha256(msg.sha256):
            return self._reject(peer, "malformed", f"sha256 {str(msg.sha256)[:80]!r} is not 64 lowercase hex digits")
        if not MIN_CHUNK <= msg.chunk_size <= MAX_CHUNK:
            return web.Response(status=400, text=f"chunk_size must be {MIN_CHUNK}..{MAX_CHUNK} bytes")
        path = self.lookup(msg.sha256)
        if path is None:
            return web.Response(status=404, text=f"{self.node_id} does not hold {msg.sha256}")
        if msg.chunk < 0:
            return web.json_response(await self._manifest(path, msg.sha256, msg.chunk_size))
        size = path.stat().st_size
        offset = msg.chunk * msg.chunk_size
        if offset >= max(size, 1):
            return web.Response(status=416, text=f"chunk {msg.chunk} is past the end of a {size}-byte file")
        body = await asyncio.to_thread(read_chunk, path, offset, msg.chunk_size)
        if self.corrupt and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.on_served(len(body))
        log.debug("served chunk %d of %s to %s", msg.chunk, msg.sha256[:12], src)
        return web.Response(body=body, content_type="application/octet-stream")

    async def _manifest(self, path: Path, sha256: str, chunk_size: int) -> dict:
        st = path.stat()
        key = ("manifest", sha256, chunk_size, st.st_size, st.st_mtime_ns)
        hit = self.cache.get(key)
        if hit is None:
            hit = await asyncio.to_thread(manifest, path, sha256, chunk_size)
            self.cache.set(key, hit)
        return hit

    def _reject(self, peer: str, reason: str, detail: str) -> web.Response:
        self.rejected += 1
        if self.on_rejected is not None:
            self.on_rejected(reason)
        now = time.monotonic()
        if now - self._logged.get(peer, float("-inf")) >= 60:
            self._logged[peer] = now
            log.warning("refused a model-file request from %s: %s (%s); logged once a minute per address",
                        peer, reason, detail)
        return web.Response(status=envelope.REJECT_STATUS.get(reason, 400), text=reason)

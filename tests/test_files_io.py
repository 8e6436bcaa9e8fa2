"""Model-file I/O over real loopback sockets: signed chunk requests (and refusals), a fetch from two
holders one of which corrupts, resume after a crash, whole-file verification, the disk budget on real
files, the sha256 cache, and the Hugging Face download path against a local HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import aiohttp
import diskcache
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from aivailable.config import NodeConfig
from aivailable.files import hub
from aivailable.files.fetch import Fetcher, Transfer, TransferFailed
from aivailable.files.index import FileIndex
from aivailable.files.plan import PlanConfig
from aivailable.files.serve import FILES_PATH, FileServer
from aivailable.files.service import FileService
from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest

SECRET = b"files-test-secret-0123456789"


def sync(fn):
    """Run an async test body in a fresh event loop (no async plugin needed)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper
CHUNK = 64 << 10


@pytest.fixture
def blob(tmp_path) -> tuple[Path, str]:
    data = os.urandom(5 * CHUNK + 1234)
    p = tmp_path / "model.gguf"
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


async def serve(tmp_path: Path, name: str, files: dict[str, Path], *, corrupt: bool = False):
    cache = diskcache.Cache(str(tmp_path / f"{name}-cache"))
    server = FileServer(name, SECRET, files.get, cache)
    server.corrupt = corrupt
    app = web.Application()
    app.router.add_post(FILES_PATH, server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"127.0.0.1:{port}", server


def sealed(sha: str, chunk: int, secret: bytes = SECRET, sender: str = "asker") -> bytes:
    return envelope.seal(FileRequest(sha256=sha, chunk_size=CHUNK, chunk=chunk), secret, sender, time.time(),
                         os.urandom(12))


@sync
async def test_chunk_requests_need_a_valid_signature(tmp_path, blob):
    path, sha = blob
    runner, addr, server = await serve(tmp_path, "holder", {sha: path})
    url = f"http://{addr}{FILES_PATH}"
    try:
        async with aiohttp.ClientSession() as s:
            async def post(body: bytes) -> tuple[int, bytes]:
                async with s.post(url, data=body) as r:
                    return r.status, await r.read()

            status, body = await post(b"GET me chunk 0 please")
            assert status == 400 and body == b"malformed"
            status, body = await post(sealed(sha, 0, secret=b"not-the-cluster-secret"))
            assert status == 401 and body == b"bad_signature"
            good = sealed(sha, 0)
            status, body = await post(good)
            assert status == 200 and body == path.read_bytes()[:CHUNK]
            status, body = await post(good)  # the same signed request again
            assert status == 400 and body == b"replayed"
            status, body = await post(sealed("0" * 64, 0))
            assert status == 404
            status, body = await post(sealed(sha, 99))
            assert status == 416
            assert server.rejected == 3
    finally:
        await runner.cleanup()


@sync
async def test_fetch_from_two_holders_one_corrupt(tmp_path, blob):
    path, sha = blob
    r1, a1, _ = await serve(tmp_path, "good", {sha: path})
    r2, a2, _ = await serve(tmp_path, "evil", {sha: path}, corrupt=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    bad: list[str] = []
    from aivailable.files.fetch import FetchCounters

    f = Fetcher(node_id="asker", secret=SECRET, fetched_dir=dest, chunk_size=CHUNK, seed=1,
                counters=FetchCounters(corrupt=bad.append))
    t = Transfer(model="m", sha256=sha, size=path.stat().st_size)
    try:
        out = await f.fetch(t, lambda: {"good": a1, "evil": a2})
    finally:
        await f.close()
        await r1.cleanup()
        await r2.cleanup()
    assert out == dest / f"{sha}.gguf" and out.read_bytes() == path.read_bytes()
    assert t.state == "done" and t.peers == {"good": path.stat().st_size}
    assert "evil" in f.bad_peers and bad and set(bad) == {"evil"} and "corrupt" in t.banned["evil"]
    assert not (dest / f"{sha}.partial").exists() and not (dest / f"{sha}.parts").exists()


@sync
async def test_only_holder_corrupt_means_no_file(tmp_path, blob):
    path, sha = blob
    r, a, _ = await serve(tmp_path, "evil", {sha: path}, corrupt=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    f = Fetcher(node_id="asker", secret=SECRET, fetched_dir=dest, chunk_size=CHUNK,
                plan_config=PlanConfig(give_up_after_s=0.5))
    t = Transfer(model="m", sha256=sha, size=path.stat().st_size)
    try:
        with pytest.raises(TransferFailed, match="evil .served corrupt data"):
            await f.fetch(t, lambda: {"evil": a})
    finally:
        await f.close()
        await r.cleanup()
    assert not (dest / f"{sha}.gguf").exists()


@sync
async def test_whole_file_mismatch_is_deleted_never_renamed(tmp_path, blob):
    path, sha = blob
    claimed = hashlib.sha256(b"what the catalog says").hexdigest()
    r, a, _ = await serve(tmp_path, "liar", {claimed: path})  # honest chunks of the wrong file
    dest = tmp_path / "dest"
    dest.mkdir()
    f = Fetcher(node_id="asker", secret=SECRET, fetched_dir=dest, chunk_size=CHUNK)
    t = Transfer(model="m", sha256=claimed, size=path.stat().st_size)
    try:
        with pytest.raises(TransferFailed, match="whole file hashes to"):
            await f.fetch(t, lambda: {"liar": a})
    finally:
        await f.close()
        await r.cleanup()
    assert list(dest.iterdir()) == []


@sync
async def test_crash_mid_transfer_resumes_from_the_bitmap(tmp_path, blob):
    path, sha = blob
    r, a, _ = await serve(tmp_path, "holder", {sha: path})
    dest = tmp_path / "dest"
    dest.mkdir()
    size = path.stat().st_size
    slow = Fetcher(node_id="asker", secret=SECRET, fetched_dir=dest, chunk_size=CHUNK, bandwidth_bps=4 * CHUNK)
    t = Transfer(model="m", sha256=sha, size=size)
    task = asyncio.create_task(slow.fetch(t, lambda: {"holder": a}))
    try:
        while t.bytes_done < 2 * CHUNK:
            await asyncio.sleep(0.05)
        task.cancel()  # the node dies here
        with pytest.raises(asyncio.CancelledError):
            await task
        await slow.close()
        assert (dest / f"{sha}.parts").exists() and not (dest / f"{sha}.gguf").exists()
        fresh = Fetcher(node_id="asker", secret=SECRET, fetched_dir=dest, chunk_size=CHUNK)
        t2 = Transfer(model="m", sha256=sha, size=size)
        out = await fresh.fetch(t2, lambda: {"holder": a})
        await fresh.close()
    finally:
        await r.cleanup()
    assert t2.resumed_bytes >= 2 * CHUNK and t2.peers["holder"] == size - t2.resumed_bytes
    assert out.read_bytes() == path.read_bytes()


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    f = models / "dropped.gguf"
    f.write_bytes(b"A" * 1000)
    st = f.stat()
    with diskcache.Cache(str(tmp_path / "cache")) as cache:
        idx = FileIndex(models, cache, {})
        [first] = idx.scan()
        sha = hashlib.sha256(b"A" * 1000).hexdigest()
        assert (first.sha256, first.origin, first.name) == (sha, "dropped", "dropped")
        f.write_bytes(b"B" * 1000)  # same size; restore the mtime: the cache must answer, no re-hash
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert [f.sha256 for f in FileIndex(models, cache, {}).scan()] == [sha]
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a real change: hashed again
        assert [f.sha256 for f in FileIndex(models, cache, {}).scan()] == [hashlib.sha256(b"B" * 1000).hexdigest()]


def test_disk_budget_removes_old_unused_never_in_use_or_pinned(tmp_path):
    cfg = NodeConfig(state_dir=str(tmp_path / "state"), disk_budget_mib=1)
    mib = 1 << 20
    with diskcache.Cache(str(tmp_path / "cache")) as cache:
        shas = {}
        fetched = cfg.models_path / "fetched"
        fetched.mkdir(parents=True)
        for i, name in enumerate(("old", "busy", "pinned", "recent")):
            data = bytes([i]) * (mib // 4)
            shas[name] = hashlib.sha256(data).hexdigest()
            (fetched / f"{shas[name]}.gguf").write_bytes(data)
        svc = FileService(node_id="n", cfg=cfg, models={}, cache=cache, secret=SECRET, registry=CollectorRegistry(),
                          peers=lambda sha: {}, in_use=lambda: {shas["busy"]}, pinned=lambda: {shas["pinned"]})
        asyncio.run(svc.rescan())
        assert len(svc.files) == 4
        for age, name in enumerate(("busy", "pinned", "old", "recent")):  # busy and pinned are the oldest
            cache.set(("last-used", shas[name]), 1000.0 + age)
        svc._make_room(Transfer(model="new", sha256="f" * 64, size=mib // 4))
        assert not (fetched / f"{shas['old']}.gguf").exists()
        assert all((fetched / f"{shas[n]}.gguf").exists() for n in ("busy", "pinned", "recent"))
        svc._make_room(Transfer(model="new", sha256="f" * 64, size=mib // 2))
        assert not (fetched / f"{shas['recent']}.gguf").exists()
        assert all((fetched / f"{shas[n]}.gguf").exists() for n in ("busy", "pinned"))
        with pytest.raises(TransferFailed, match="disk budget of 1 MiB"):
            svc._make_room(Transfer(model="huge", sha256="f" * 64, size=mib))
        assert all((fetched / f"{shas[n]}.gguf").exists() for n in ("busy", "pinned"))


@sync
async def test_hugging_face_download_against_a_local_server(tmp_path):
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    seen: list[str] = []

    async def resolve(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        if request.match_info["repo"] != "lab/tiny-GGUF" or request.match_info["file"] != "tiny-q4.gguf":
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": "0" * 40, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Content-Length": str(len(data)),
                   "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=data, headers={k: v for k, v in headers.items() if k != "Content-Length"})

    app = web.Application()
    app.router.add_route("*", "/{repo:[^/]+/[^/]+}/resolve/{rev}/{file}", resolve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    endpoint = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    dest = tmp_path / "fetched"
    dest.mkdir()
    try:
        path, digest = await asyncio.to_thread(hub.download, "hf://lab/tiny-GGUF/tiny-q4.gguf", dest,
                                               expected_sha256=sha, endpoint=endpoint)
        assert digest == sha and path == dest / f"{sha}.gguf" and path.read_bytes() == data
        assert any(s.startswith("GET /lab/tiny-GGUF/resolve/") for s in seen)
        with pytest.raises(ValueError, match="catalog says sha256"):
            await asyncio.to_thread(hub.download, "hf://lab/tiny-GGUF/tiny-q4.gguf", dest,
                                    expected_sha256="e" * 64, endpoint=endpoint)
    finally:
        await runner.cleanup()
    assert hub.parse_source("hf://a/b/sub/f.gguf") == ("a/b", "sub/f.gguf")
    with pytest.raises(ValueError):
        hub.parse_source("hf://a/f.gguf")


def test_only_a_sha256_names_a_fetched_file_and_never_outside_its_folder(tmp_path):
    """A gossiped sha256 becomes a file name: anything but 64 lowercase hex digits, or a path that leaves
    the fetched folder (a planted symlink), is refused before any file is opened (issue 20, defect 7)."""
    fetched = tmp_path / "models" / "fetched"
    fetched.mkdir(parents=True)
    victim = tmp_path / "models" / "victim.gguf"  # "load any existing *.gguf on its disk"
    victim.write_bytes(b"GGUF not yours")
    f = Fetcher(node_id="n1", secret=SECRET, fetched_dir=fetched, chunk_size=CHUNK)
    for bad in ("../victim", "A" * 64, "0" * 63, "0" * 64 + "/../../x", "", "../" * 20 + "etc/x"):
        with pytest.raises(TransferFailed, match="not a sha256"):
            f.paths(bad)
    with pytest.raises(TransferFailed):
        asyncio.run(f.fetch(Transfer(model="m", sha256="../victim", size=14), lambda: {}))
    assert victim.read_bytes() == b"GGUF not yours"
    good = "a" * 64
    (fetched / f"{good}.partial").symlink_to(tmp_path / "outside.partial")
    with pytest.raises(TransferFailed, match="outside the models folder"):
        f.paths(good)
    assert not (tmp_path / "outside.partial").exists()
    assert f.paths("b" * 64) == tuple((fetched / f"{'b' * 64}{ext}").resolve() for ext in (".gguf", ".partial", ".parts"))


def test_gossiped_catalog_entries_with_bad_names_or_hashes_are_dropped():
    from aivailable.files.catalog import merge

    good = {"name": "gemma", "sha256": "c" * 64, "ctx": 512}
    catalog, conflicts = merge([("n1", [good, {"name": "evil", "sha256": "../../../etc/x"},
                                        {"name": "<img src=x>", "sha256": "d" * 64},
                                        {"name": "upper", "sha256": "E" * 64}, "not a dict"])])
    assert catalog == {"gemma": good} and conflicts == {}

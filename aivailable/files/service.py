"""The node's model-file service: what it holds, what it offers, what it fetches, and its disk budget.

Owned by the node (one asyncio owner; no locks). `held()` and `catalog_entries()` go into the node's
gossiped facts; `path_for()` tells the engine where a model's file is; `want()` starts a transfer for
a model placed here whose file this node lacks, and calls `on_ready` once the file is verified.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from aivailable.config import ModelConfig, NodeConfig
from aivailable.engine.mmproj_info import is_projector
from aivailable.files import hub
from aivailable.files.budget import StoredFile, plan_evictions
from aivailable.files.fetch import FetchCounters, Fetcher, Transfer, TransferFailed
from aivailable.files.index import FileIndex, LocalFile, gguf_defaults
from aivailable.files.plan import PlanConfig
from aivailable.files.serve import FileServer
from aivailable.gossip.peerhttp import PeerDialer
from aivailable.names import MODEL_NAME_RULE, is_model_name, is_sha256

log = logging.getLogger("aivailable.files")

RETRY_FAILED_S = 30.0
"""A failed transfer of a model still placed here is tried again after this long."""
MMPROJ = ".mmproj"
"""A configured projector is indexed under its model's name plus this (files/index.py)."""
RESCAN_S = 10.0
"""How often the models directory is rescanned for dropped-in files (only new files are hashed)."""


class FileService:
    """Index, offers, transfers and disk budget of one node."""

    def __init__(self, *, node_id: str, cfg: NodeConfig, models: dict[str, ModelConfig], cache: Any,
                 secret: bytes, registry: CollectorRegistry, peers: Callable[[str], dict[str, str]],
                 in_use: Callable[[], set[str]], pinned: Callable[[], set[str]]):
        self.node_id, self.cfg, self.models, self.cache = node_id, cfg, models, cache
        self.peers, self.in_use, self.pinned = peers, in_use, pinned
        config_paths = {n: m.path for n, m in models.items() if m.path}
        config_paths.update({n + MMPROJ: m.mmproj for n, m in models.items() if m.mmproj})
        self.index = FileIndex(cfg.models_path, cache, config_paths)
        self.files: dict[str, LocalFile] = {}
        """sha256 -> one local copy (what peers may fetch)"""
        self.found: list[LocalFile] = []
        self.offers: dict[str, dict] = {}
        self._entries: list[dict] | None = None  # catalog_entries(), until files/offers change
        self.transfers: dict[str, Transfer] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._retry_at: dict[str, float] = {}
        self._bg: list[asyncio.Task] = []
        self._bad_names: set[Path] = set()
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self.on_event: Callable[[str], None] = lambda text: None
        """Outcomes of transfers for the status page's recent changes (they are logged here too)."""
        self.bytes_in = Counter("aivailable_file_bytes_received", "Model-file bytes received from peers",
                                ["peer"], registry=registry)
        self.bytes_out = Counter("aivailable_file_bytes_served", "Model-file bytes served to peers", registry=registry)
        self.outcomes = Counter("aivailable_file_transfers", "Model-file transfers by outcome (done, failed)",
                                ["outcome"], registry=registry)
        self.corrupt = Counter("aivailable_file_corrupt_chunks", "Chunks that failed sha256 verification, by peer",
                               ["peer"], registry=registry)
        self.fetcher = Fetcher(
            node_id=node_id, secret=secret, fetched_dir=self.index.fetched_dir,
            chunk_size=int(cfg.chunk_mib * 2**20), bandwidth_bps=cfg.bandwidth_mib_s * 2**20,
            plan_config=PlanConfig(give_up_after_s=10.0 if cfg.profile == "local" else 300.0),
            counters=FetchCounters(received=lambda p, n: self.bytes_in.labels(p).inc(n),
                                   corrupt=lambda p: self.corrupt.labels(p).inc()))
        self.server = FileServer(node_id, secret, self.lookup, cache, on_served=self.bytes_out.inc)

    # -- lifecycle -----------------------------------------------------------------------------------
    def use_dialer(self, dialer: PeerDialer) -> None:
        """Reach peers through `dialer` (the cluster's TLS settings) when fetching files."""
        self.fetcher.dialer = dialer

    async def start(self) -> None:
        await self.rescan()
        for m in self.models.values():
            if m.source and not (m.path and Path(m.path).expanduser().is_file()) and \
                    not (m.sha256 and m.sha256 in self.files):
                await self._download_hf(m)
            if m.mmproj_source and not (m.mmproj and Path(m.mmproj).expanduser().is_file()) and \
                    not (m.mmproj_sha256 and m.mmproj_sha256 in self.files):
                await self._download_hf(m, projector=True)
        self._bg.append(asyncio.create_task(self._rescan_loop(), name="models dir rescan"))

    async def stop(self) -> None:
        for t in [*self._bg, *self._tasks.values()]:
            t.cancel()
        await self.fetcher.close()

    async def rescan(self) -> bool:
        """Re-index the models directory (new files are hashed in a thread); True if anything changed."""
        found = await asyncio.to_thread(self.index.scan)
        files: dict[str, LocalFile] = {}
        for f in found:
            files.setdefault(f.sha256, f)
        offers = {}
        for f in found:
            if f.origin == "dropped":
                if not is_model_name(f.name):
                    if f.path not in self._bad_names:  # said once per file
                        self._bad_names.add(f.path)
                        log.warning("not offering %s: its name %r is not a model name (%s); rename the file",
                                    f.path, f.name[:140], MODEL_NAME_RULE)
                    continue
                if await asyncio.to_thread(is_projector, f.path):
                    continue  # an mmproj next to its model: served to peers by sha256, not a model to offer
                try:
                    defaults = await asyncio.to_thread(gguf_defaults, f.path, self.cache)
                except Exception as exc:  # not a usable GGUF: not offered, said once per scan
                    log.warning("not offering %s: %s", f.path, exc)
                    continue
                offers[f.name] = {"name": f.name, "sha256": f.sha256, "size": f.size, "offered": True, **defaults}
        changed = set(files) != set(self.files) or offers != self.offers
        self.files, self.offers, self.found = files, offers, found
        self._entries = None
        return changed

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_S)
            try:
                changed = await self.rescan()
                if (changed or self._retry_due()) and self.on_change is not None:
                    await self.on_change()
            except Exception:
                log.exception("rescanning %s failed", self.cfg.models_path)

    async def _download_hf(self, m: ModelConfig, projector: bool = False) -> None:
        source, sha = (m.mmproj_source, m.mmproj_sha256) if projector else (m.source, m.sha256)
        try:
            path, digest = await asyncio.to_thread(hub.download, source, self.index.fetched_dir,
                                                   expected_sha256=sha)
        except Exception as exc:  # no internet in many labs: say so; peers may still serve it by sha256
            log.error("model %s: cannot download %s: %s", m.name, source, exc)
            return
        self.index.remember(path, digest)
        await self.rescan()

    # -- what this node holds and offers -------------------------------------------------------------
    def lookup(self, sha256: str) -> Path | None:
        f = self.files.get(sha256)
        return f.path if f is not None and f.path.exists() else None

    def held(self) -> dict[str, dict]:
        """sha256 -> {size, name} of every complete, verified file here (gossiped as `files`)."""
        return {s: {"size": f.size, "name": f.name} for s, f in sorted(self.files.items())}

    def catalog_entries(self) -> list[dict]:
        """This node's config definitions (with sha256/size where it holds the file) and its offers.

        The same list object until the files or offers change (callers may cache on its identity;
        read it, never change it)."""
        if self._entries is None:
            self._entries = self._build_entries()
        return self._entries

    def _build_entries(self) -> list[dict]:
        by_name = {f.name: f for f in self.found if f.origin == "config"}
        out = []
        for name, m in self.models.items():
            d = m.model_dump(mode="json", exclude_none=True)
            f = by_name.get(name)
            if f is not None:
                if m.sha256 and m.sha256 != f.sha256:
                    log.error("model %s: %s hashes to %s, but its config says sha256 = %s", name, f.path,
                              f.sha256, m.sha256)
                d["sha256"], d["size"] = d.get("sha256", f.sha256), f.size
            elif m.sha256 and m.sha256 in self.files:
                d["size"] = self.files[m.sha256].size
            p = by_name.get(name + MMPROJ)
            if p is not None:
                if m.mmproj_sha256 and m.mmproj_sha256 != p.sha256:
                    log.error("model %s: projector %s hashes to %s, but its config says mmproj_sha256 = %s", name,
                              p.path, p.sha256, m.mmproj_sha256)
                d["mmproj_sha256"], d["mmproj_size"] = d.get("mmproj_sha256", p.sha256), p.size
            elif m.mmproj_sha256 and m.mmproj_sha256 in self.files:
                d["mmproj_size"] = self.files[m.mmproj_sha256].size
            out.append(d)
        out += [o for n, o in sorted(self.offers.items()) if n not in self.models]
        return out

    def path_for(self, name: str, entry: dict) -> Path | None:
        """This node's copy of catalog model `name`'s file, or None when it must be fetched first."""
        sha = entry.get("sha256")
        if sha:
            return self.lookup(sha)
        m = self.models.get(name)
        if m is not None and m.path and Path(m.path).expanduser().is_file():
            return Path(m.path).expanduser()
        return None

    def projector_path_for(self, name: str, entry: dict) -> Path | None:
        """This node's copy of catalog model `name`'s projector (mmproj), or None (none, or not here yet)."""
        sha = entry.get("mmproj_sha256")
        if sha:
            return self.lookup(sha)
        m = self.models.get(name)
        if m is not None and m.mmproj and Path(m.mmproj).expanduser().is_file():
            return Path(m.mmproj).expanduser()
        return None

    def want_projector(self, name: str, entry: dict, on_ready: Callable[[], Awaitable[None]]) -> str:
        """`want` for the model's projector file (fetched like a model file, by its sha256)."""
        return self.want(f"{name} (projector)", {"sha256": entry.get("mmproj_sha256"),
                                                 "size": entry.get("mmproj_size")}, on_ready)

    # -- transfers -----------------------------------------------------------------------------------
    def want(self, name: str, entry: dict, on_ready: Callable[[], Awaitable[None]]) -> str:
        """Make sure `name`'s file is being fetched; returns a short state for the log."""
        sha = entry.get("sha256")
        if not sha:
            return "no sha256 known for it yet (no live node holds its file)"
        if not is_sha256(sha):
            return f"its catalog sha256 {str(sha)[:80]!r} is not 64 lowercase hex digits; not fetching it"
        if sha in self._tasks and not self._tasks[sha].done():
            return "fetching"
        if time.monotonic() < self._retry_at.get(sha, 0.0):
            return f"last transfer failed: {self.transfers[sha].error}"
        t = Transfer(model=name, sha256=sha, size=int(entry.get("size") or 0))
        self.transfers[sha] = t
        self._tasks[sha] = asyncio.create_task(self._fetch(t, on_ready), name=f"fetch {name}")
        return "fetching"

    async def _fetch(self, t: Transfer, on_ready: Callable[[], Awaitable[None]]) -> None:
        log.info("model %s is placed here but its file is not: fetching %s (%.1f MiB) from peers %s",
                 t.model, t.sha256[:12], t.size / 2**20, ", ".join(sorted(self.peers(t.sha256))) or "(none yet)")
        try:
            self._make_room(t)
            path = await self.fetcher.fetch(t, lambda: self.peers(t.sha256))
        except TransferFailed as exc:
            t.state, t.error, t.finished = "failed", str(exc), time.monotonic()
            self._retry_at[t.sha256] = time.monotonic() + RETRY_FAILED_S
            self.outcomes.labels("failed").inc()
            log.error("model %s: transfer of %s failed: %s; retrying in %.0fs while it is placed here",
                      t.model, t.sha256[:12], exc, RETRY_FAILED_S)
            self.on_event(f"could not fetch the file of {t.model}: {exc}")
            return
        except Exception as exc:
            t.state, t.error, t.finished = "failed", f"{type(exc).__name__}: {exc}", time.monotonic()
            self._retry_at[t.sha256] = time.monotonic() + RETRY_FAILED_S
            self.outcomes.labels("failed").inc()
            log.exception("model %s: transfer of %s failed", t.model, t.sha256[:12])
            return
        self.outcomes.labels("done").inc()
        self.index.remember(path, t.sha256)
        self.cache.set(("last-used", t.sha256), time.time())
        took = (t.finished or time.monotonic()) - t.started
        log.info("model %s: file %s verified (%.1f MiB in %.1fs); loading", t.model, t.sha256[:12],
                 t.size / 2**20, took)
        self.on_event(f"fetched the file of {t.model} ({t.size / 2**20:.1f} MiB in {took:.1f}s from "
                      f"{', '.join(sorted(t.peers)) or 'a local copy'})")
        await self.rescan()
        await on_ready()

    def _make_room(self, t: Transfer) -> None:
        budget = self.cfg.disk_budget_mib * 2**20
        if budget <= 0:
            return
        in_use, pinned = self.in_use(), self.pinned()
        stored = [StoredFile(s, f.size, float(self.cache.get(("last-used", s)) or f.path.stat().st_mtime),
                             in_use=s in in_use, pinned=s in pinned)
                  for s, f in self.files.items() if f.origin == "fetched" and s != t.sha256]
        plan = plan_evictions(stored, budget, t.size)
        if not plan.fits:
            raise TransferFailed(f"disk budget of {self.cfg.disk_budget_mib} MiB: {t.size / 2**20:.1f} MiB do not "
                                 f"fit even after removing every unused file (short by {plan.short_by / 2**20:.1f} "
                                 "MiB); raise --disk-budget-mib or free files in use")
        for sha in plan.remove:
            f = self.files.pop(sha)
            self._entries = None
            log.warning("disk budget: removing %s (%s, %.1f MiB, unused) to make room for %s", f.path, f.name,
                        f.size / 2**20, t.model)
            self.on_event(f"disk budget: removed unused {f.name} ({f.size / 2**20:.1f} MiB) for {t.model}")
            f.path.unlink(missing_ok=True)

    def _retry_due(self) -> bool:
        """True once a failed transfer may be tried again (the node's reconcile calls `want` anew)."""
        now = time.monotonic()
        due = [s for s, at in self._retry_at.items() if at <= now]
        for s in due:
            del self._retry_at[s]
        return bool(due)

    def touch(self, shas: set[str]) -> None:
        """Record that workers use these files now (the disk budget removes least recently used first)."""
        now = time.time()
        for s in shas:
            self.cache.set(("last-used", s), now)

    def views(self) -> list[dict]:
        """Transfers for the status page: running ones and the last outcome of each file."""
        return [t.view() for t in sorted(self.transfers.values(), key=lambda t: t.started)][-20:]

    def bad_peers(self) -> dict[str, str]:
        return dict(self.fetcher.bad_peers)

"""The node: wires config, devices, engine and API together; owns the event loop and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import NoReturn

from aiohttp import web

from aivailable import api_tls, keepalive, leave, statedir
from aivailable import coordinator as coord
from aivailable.api.app import build_app
from aivailable.api.connections import raise_open_file_limit
from aivailable.api.image_input import accepts_images
from aivailable.api.metrics import NodeMetrics
from aivailable.api.router import Upstream
from aivailable.autonomy_state import AutonomousReplicas
from aivailable.cluster import Cluster
from aivailable.config import ModelConfig, Settings, token_budget
from aivailable.coordinator import Assignments, NodeFacts
from aivailable.drain import Drainer
from aivailable.engine import devices as devmod
from aivailable.engine import replica_estimate
from aivailable.engine.manager import Assignment, ManagerConfig, WorkerHandle, WorkerManager
from aivailable.engine.mmproj_info import projector_mib
from aivailable.engine.spawn import Spawn
from aivailable.errors import ModelUnavailable, NodeStarting
from aivailable.files.service import FileService
from aivailable.gossip import tls
from aivailable.gossip.state_store import StateStore
from aivailable.keysync import KeySync
from aivailable.listeners import open_listeners
from aivailable.node_api import NodeApi
from aivailable.observe import Observer
from aivailable.shutdown import run_steps

log = logging.getLogger("aivailable.node")

_NO_CATALOG: dict[str, dict] = {}
"""The cluster catalog of a node without a cluster transport (one shared object, so models() can cache)."""


class Node:
    """One machine's node: engine (workers on local GPUs), API, and its part of the cluster."""

    def __init__(self, settings: Settings, *, manager_config: ManagerConfig | None = None,
                 spawn: Spawn | None = None):
        self.settings = settings
        self.state_dir = settings.node.state_path
        statedir.check_writable(self.state_dir)
        self.catalog: dict[str, ModelConfig] = {m.name: m for m in settings.models}
        self._models_cache: tuple[dict, list[dict], dict] | None = None
        self.started_at = time.monotonic()
        self.started_at_unix = int(time.time())
        self.inventory = devmod.discover(list(settings.node.simulate_gpus))
        self.backend = self.inventory.backend
        self.manager = WorkerManager(manager_config, socket_dir=self._socket_dir(), spawn=spawn)
        self.node_id = statedir.load_node_id(self.state_dir, settings.node.node_id)
        StateStore(self.state_dir / "cluster").close()  # unreadable term/vote: refuse before serving anything
        self.unplaced: dict[str, str] = {}
        self.estimates: dict[str, float] = {}
        self.kv_estimates: dict[str, dict[str, float]] = {}  # kv_cache_type "auto": MiB per type, best first
        self.placement: Assignments = {}
        self.planned = False
        self.autonomous = AutonomousReplicas()
        """Replicas this node runs without a coordinator, and those retiring (changed by AutonomyLoop only)."""
        self.drainer = Drainer(self)
        """The operator's maintenance drain (STATE_DIR/drain.json; aivailable/drain.py)."""
        self.leaving = False
        """SIGTERM received: models are being handed over, requests drained (see aivailable.leave)."""
        self.events: list[dict] = []
        self.rate_limited: dict[str, int] = {}  # API key fingerprint -> requests refused with 429
        self.usage = keepalive.Usage()
        """When this node's clients last used each model (gossiped; the coordinator unloads idle models)."""
        for name in self.catalog:  # configured: loaded at start, so the keep-alive counts from then
            self.usage.touch(name, time.time())
        self.cache = statedir.open_disposable_cache(self.state_dir / "cache")
        self.metrics = NodeMetrics(self._metrics_snapshot)
        self.observe = Observer(self)
        self.manager.on_health = self.observe.fold
        self.metrics.registry.register(self.observe)
        self.cluster = Cluster(self)
        self.files = FileService(node_id=self.node_id, cfg=settings.node, models=self.catalog, cache=self.cache,
                                 secret=self.cluster.secret, registry=self.metrics.registry,
                                 peers=self.cluster.holders_of, in_use=self._files_in_use,
                                 pinned=self._pinned_files)
        self.files.use_dialer(self.cluster.dialer)
        self.keys = KeySync(node_id=self.node_id, secret=self.cluster.secret, state_dir=self.state_dir,
                            session=lambda: self.cluster.peer_session, peers=self.cluster.key_peers,
                            on_rejected=self._count_rejection, dialer=self.cluster.dialer)
        """The cluster's API keys: this node's replica of the set (aivailable/keysync.py)."""
        self.files.on_change = self._files_changed
        self.files.server.on_rejected = self._count_rejection
        self.files.on_event = lambda text: self.record_event(f"{self.node_id}: {text}", logged=True)
        self._reconcile_lock = asyncio.Lock()
        self._waiting: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._redirect: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self.port: int | None = None

    # -- identity and state --------------------------------------------------------------------
    def _socket_dir(self) -> str:
        d = self.state_dir / "run"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    @property
    def address(self) -> str:
        """host:port that peers and the status page use to reach this node."""
        from aivailable.gossip.discovery import advertise_host

        host = self.settings.node.advertise_host or advertise_host(self.settings.node.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    # -- facts and planning -------------------------------------------------------------------
    async def estimate_models(self) -> None:
        """VRAM each model whose file this node holds needs (GGUF metadata; read in a thread, cached)."""
        for name, m in self.models().items():
            if name in self.estimates or self.unplaced.get(name, "").startswith("cannot read"):
                continue
            path = self.files.path_for(name, m)
            if path is None:
                continue
            try:
                by_type = await asyncio.to_thread(
                    replica_estimate.needs_by_kv_type, self.cache, path, int(m.get("ctx", 4096)),
                    int(m.get("parallel", 1)), m.get("kv_cache_type"), on_cpu=self.inventory.simulated)
                projector = await asyncio.to_thread(projector_mib, m, self.files.projector_path_for(name, m))
                by_type = {kv: mib + projector for kv, mib in by_type.items()}
                self.estimates[name] = next(iter(by_type.values()))
                if len(by_type) > 1:
                    self.kv_estimates[name] = by_type
                self.unplaced.pop(name, None)
            except Exception as exc:  # unreadable or not a GGUF: say so on the status page
                self.unplaced[name] = f"cannot read {path}: {exc}"
                log.error("model %s: %s", name, self.unplaced[name])

    def _files_in_use(self) -> set[str]:
        paths = {str(Path(p).resolve()) for h in self.manager.workers.values() if h.state != "stopped"
                 for p in (h.assignment.path, h.assignment.mmproj) if p}
        return {s for s, f in self.files.files.items() if str(f.path.resolve()) in paths}

    def _pinned_files(self) -> set[str]:
        return {s for m in self.models().values() if m.get("pinned") for s in (m.get("sha256"), m.get("mmproj_sha256"))
                if s}

    async def _files_changed(self) -> None:
        """A file arrived or appeared: estimate it and start any replica that waited for it."""
        await self.estimate_models()
        await self.reconcile()

    async def reconcile(self) -> None:
        """Run this node's share of the current placement (serialized: transfers and placements both call it)."""
        if self.leaving:
            return  # keep every worker until this node's requests have drained (aivailable.leave)
        async with self._reconcile_lock:
            await self.manager.reconcile(self.assignments_for(self.serving()))
            self.files.touch(self._files_in_use())

    def serving(self) -> Assignments:
        """The placement plus this node's autonomous and retiring replicas (each on one own GPU)."""
        extra = self.autonomous.serving()
        kept = self.drainer.kept()  # drained replicas serving until their model is ready elsewhere
        if not extra and not kept:
            return self.placement
        out = {m: list(reps) for m, reps in self.placement.items()}
        for model, row in kept:
            out.setdefault(model, []).append(row)
        for model, gpu in extra.items():
            mine = [r for r in out.get(model, []) if r["node"] == self.node_id and gpu in r["gpus"]]
            if not mine:
                out.setdefault(model, []).append({"node": self.node_id, "gpus": [gpu]})
        return out

    def _autonomy_of(self, h: WorkerHandle) -> dict:
        """How an autonomous or retiring replica shows in facts and /api/cluster ({} for a placed one)."""
        if self.autonomous.is_retiring(h.model, h.assignment.device_ids):
            return {"autonomous": "retiring: the coordinator's placement replaces it", "state": "retiring"}
        why = self.autonomous.reason(h.model, h.assignment.device_ids)
        return {} if why is None else {"autonomous": why}

    def facts(self) -> NodeFacts:
        """This node's facts for the coordinator (and, in a cluster, for gossip)."""
        claims = self.manager.vram_claims()
        devices = []
        for d in self.inventory.devices:
            usable, _why = devmod.usable(d, self.backend)
            devices.append({"id": d.id, "vendor": d.vendor, "name": d.name, "vram_total_mib": d.vram_total_mib,
                            "vram_used_mib": d.vram_used_mib, "simulated": d.simulated, "usable": usable})
        replicas = [{**h.view(), "outstanding": self._upstream(h).outstanding, **self._autonomy_of(h),
                     **({"drained": True} if self.drainer.draining(h) else {})}
                    for h in self.manager.workers.values() if h.state != "stopped"]
        return NodeFacts(node_id=self.node_id, address=self.address, devices=devices,
                         catalog=self.files.catalog_entries(),
                         needs_mib={k: round(v, 1) for k, v in self.estimates.items()},
                         kv_needs_mib={k: {t: round(v, 1) for t, v in by.items()} for k, by in self.kv_estimates.items()},
                         replicas=replicas, rates={}, claims_mib={k: round(v, 1) for k, v in claims.items()},
                         backend=self.backend.summary(), files=self.files.held(), transfers=self.files.views(),
                         bad_peers=self.files.bad_peers(), leaving=self.leaving, usage=self.usage.view(),
                         drained=self.drainer.state.node, drained_gpus=sorted(self.drainer.state.gpus),
                         **self.keys.ring.facts(time.monotonic()))

    def assignments_for(self, assignments: Assignments) -> list[Assignment]:
        """This node's share of a placement as worker assignments."""
        devices = {d.id: d for d in self.inventory.devices}
        catalog = self.models()
        out = []
        waiting: dict[str, str] = {}
        for model, device_ids, split in coord.share(assignments, self.node_id):
            kv = coord.kv_cache_type_of(assignments, self.node_id, model, device_ids, catalog.get(model))
            m = catalog.get(model)
            devs = [devices[d] for d in device_ids if d in devices]
            if m is None or len(devs) != len(device_ids):
                log.warning("placement gives %s on %s, which this node does not have; ignoring", model, device_ids)
                continue
            path = self.files.path_for(model, m)
            mmproj = self.files.projector_path_for(model, m)
            lacks_projector = accepts_images(m) and mmproj is None
            if path is None or lacks_projector:  # fetch first (both at once); start once verified
                states = [f"file: {self.files.want(model, m, self._files_changed)}"] if path is None else []
                if lacks_projector:
                    states.append(f"projector: {self.files.want_projector(model, m, self._files_changed)}")
                waiting[model] = "; ".join(states)
                if self._waiting.get(model) != waiting[model]:
                    log.info("model %s is placed on %s but is not all here: %s", model, self.node_id, waiting[model])
                continue
            max_default, ceiling = token_budget(m, self.settings.node.max_tokens_default)
            out.append(Assignment(
                model=model, path=str(path), device_ids=device_ids, n_ctx=int(m.get("ctx", 4096)),
                parallel=int(m.get("parallel", 1)), embedding=bool(m.get("embedding", False)),
                max_queue=int(m.get("max_queue", 16)), chat_format=m.get("chat_format"),
                max_tokens_default=max_default, max_tokens_ceiling=ceiling,
                sampling=tuple(sorted((m.get("sampling") or {}).items())), mmproj=str(mmproj) if mmproj else None,
                simulated=all(d.simulated for d in devs), tensor_split=split,
                vram_estimate_mib=self.kv_estimates.get(model, {}).get(kv, self.estimates.get(model, 0.0)),
                kv_cache_type=kv,
                visible_env=tuple(devmod.device_env(self.backend.primary, devs).items())))
        self._waiting = waiting
        return out

    def apply_placement(self, term: int, version: int, assignments: Assignments) -> None:
        """Take the coordinator's placement (v`version` of `term`, fenced by the node core) as the one this
        node reconciles toward; its changes go to the status page."""
        for line in coord.describe_changes(self.placement, assignments, f"v{version}, term {term}"):
            self.record_event(line)
        self.placement = assignments
        self.planned = True

    def begin_leaving(self) -> None:
        """Graceful shutdown began (aivailable.leave): facts say leaving, routers prefer other nodes' replicas,
        and reconcile keeps every worker until requests have drained."""
        self.leaving = True

    def record_event(self, text: str, *, logged: bool = False) -> None:
        """A line for the status page's recent changes (and the log, unless the caller logged it)."""
        if not logged:
            log.info("placement: %s", text)
        self.events.append({"time": time.time(), "text": text})
        del self.events[:-100]

    # -- routing facts -------------------------------------------------------------------------
    def models(self) -> dict[str, dict]:
        """Every model the cluster serves (name -> definition), this node's own config and offers included.

        Called for every request: built again only when the cluster's catalog or this node's files change
        (a shared dict: read it, never change it)."""
        cat = self.cluster.catalog() if self.cluster.transport is not None else _NO_CATALOG
        own = self.files.catalog_entries()  # own config and offered files, also before gossip runs
        if self._models_cache is None or self._models_cache[0] is not cat or self._models_cache[1] is not own:
            merged = dict(cat)
            for m in own:
                merged.setdefault(m["name"], m)
            self._models_cache = (cat, own, merged)
        return self._models_cache[2]

    def upstreams(self, model: str, *, local_only: bool = False) -> list[Upstream]:
        """Ready replicas of `model`: this node's workers, then (unless `local_only`) peers'."""
        ready = self.manager.ready(model)
        ups = [self._upstream(h) for h in ready]
        for h, u in zip(ready, ups, strict=True):
            u.draining = self.leaving or self.autonomous.is_retiring(model, h.assignment.device_ids) \
                or self.drainer.draining(h)
        if not local_only:
            ups += self.cluster.remote_upstreams(model)
        return [u for u in ups if not u.draining] or ups  # a leaving node's replicas only as a last resort

    def upstream_of(self, h: WorkerHandle) -> Upstream:
        """The router's view of a local replica (its requests in flight)."""
        return self._upstream(h)

    def _upstream(self, h: WorkerHandle) -> Upstream:
        up = h.__dict__.get("_upstream")
        if up is None:
            up = Upstream(key=f"{self.node_id}/{h.assignment.key}", model=h.model,
                          session_fn=lambda h=h: h.session, base_url="http://worker", local=True,
                          node_id=self.node_id, slots=h.assignment.parallel)
            h.__dict__["_upstream"] = up
        return up

    def model_state(self, model: str) -> tuple[str, str]:
        """(state, reason) of a model across the cluster: ready, loading, failed, placing or unplaced."""
        if not self.planned:
            return "placing", "no placement has reached this node yet (the cluster is electing a coordinator)"
        for m in self.cluster_view()["models"]:
            if m["name"] == model:
                return m["state"], m["reason"]
        return "unplaced", "not placed yet"

    def raise_unavailable(self, model: str) -> NoReturn:
        state, reason = self.model_state(model)
        if state == "ready":  # ready elsewhere but not reachable from here (peer cooling down, hop limit)
            raise ModelUnavailable(f"model '{model}' has no reachable replica right now; retry shortly",
                                   retry_after=2)
        if state == "loading":
            raise ModelUnavailable(f"model '{model}' is loading; retry shortly", retry_after=2)
        if state == "fetching":
            raise ModelUnavailable(f"model '{model}' is being copied to the node that will serve it ({reason}); "
                                   "retry shortly", retry_after=5)
        if state == "failed" and not self.manager.replicas(model):
            raise ModelUnavailable(f"model '{model}' cannot be served: {reason}", retry_after=30)
        if state == "failed":
            reps = self.manager.replicas(model)
            wait = min((h.next_start_at for h in reps), default=time.monotonic()) - time.monotonic()
            raise ModelUnavailable(f"model '{model}' is restarting after a failure: {reason}",
                                   retry_after=max(1.0, wait + 2))
        if state == "placing":
            raise ModelUnavailable(f"model '{model}' is being placed: {reason}; retry shortly", retry_after=2)
        raise ModelUnavailable(f"model '{model}' is not placed on any GPU: {reason}; the coordinator places it "
                               "when VRAM allows (demand counts)", retry_after=10)

    # -- views ---------------------------------------------------------------------------------
    def _gpu_views(self) -> list[dict]:
        claims = self.manager.vram_claims()
        by_dev: dict[str, list[dict]] = {}
        for h in self.manager.workers.values():
            if h.state == "stopped":
                continue
            for d in h.assignment.device_ids:
                by_dev.setdefault(d, []).append(
                    {"name": h.model, "vram_mib": round((h.vram_mib or h.assignment.vram_estimate_mib)
                                                        / len(h.assignment.device_ids), 1), "state": h.state})
        out = []
        for d in self.inventory.devices:
            used = claims.get(d.id, 0.0) if d.simulated else float(d.vram_used_mib)  # real: NVML/amdsmi
            usable, why = devmod.usable(d, self.backend)
            out.append({"id": d.id, "vendor": d.vendor, "name": d.name, "simulated": d.simulated,
                        "vram_total_mib": d.vram_total_mib, "vram_used_mib": round(used, 1),
                        "usable": usable, "reason": "" if usable else why, "models": by_dev.get(d.id, []),
                        **self.observe.gpu_fields(d.id)})
        return out

    def cluster_view(self) -> dict:
        """The facts of GET /api/cluster (see CONTRACTS.md): the whole cluster as this node sees it."""
        if self.cluster.transport is None:  # not a lone-node view with term 0: its real term is not loaded yet
            raise NodeStarting(f"node {self.node_id} is starting: it has not loaded its cluster state and joined "
                               "yet; retry in a second", retry_after=1)
        view = self.cluster.view()
        view["security"] = self.security_view()
        view["keys"] = self.keys.ring.view(time.time())
        view["keys_converged"] = view["keys"]["converged"]
        disc = self.cluster.discovery
        view["cluster_id"] = self.cluster.cluster_hash  # public (mDNS announces it): no secret in it
        view["foreign_nodes"] = sorted(disc.foreign.values(), key=lambda f: f["node"]) if disc is not None else []
        return view

    def _count_rejection(self, reason: str) -> None:
        if self.cluster.transport is not None:
            self.cluster.transport.count_rejection(reason)

    def security_view(self) -> dict:
        """This node's security counters for the operator; never a key or the secret (keys by fingerprint)."""
        cfg = self.settings.node
        t = self.cluster.transport
        ctls = self.cluster.tls
        return {"api_keys_required": bool(cfg.api_keys) or self.keys.ring.protecting(),
                "protect_status": cfg.protect_status, "rate_limit_rpm": cfg.rate_limit_rpm,
                "cluster_tls": {"enabled": ctls is not None, "port": tls.cluster_port(self.port) if ctls and self.port else None,
                                "ca_fingerprint": ctls.ca.fingerprint if ctls else None},
                "client_api": api_tls.view(cfg, self.address),
                "cluster_rejected": dict(sorted((t.rejections if t is not None else {}).items())),
                "rate_limited": dict(sorted(self.rate_limited.items()))}

    def _metrics_snapshot(self) -> dict:
        workers = []
        for h in self.manager.workers.values():
            v = h.view()
            v["prompt_tokens"] = h.health.get("prompt_tokens", 0)
            v.update(self._autonomy_of(h))
            workers.append(v)
        return {"gpus": self._gpu_views(), "workers": workers}

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.settings.node
        before, after = raise_open_file_limit()
        log.info("open-file limit %d%s; at most %d connections per client address, headers within %g s, "
                 "idle keep-alive %g s", after, f" (raised from {before})" if after != before else "",
                 cfg.max_connections_per_client, cfg.header_timeout_s, cfg.keepalive_timeout_s)
        self._runner = web.AppRunner(build_app(NodeApi(self)), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=leave.DRAIN_GRACE_S, keepalive_timeout=cfg.keepalive_timeout_s)
        await self._runner.setup()
        listening = await open_listeners(
            self._runner, cfg, host=self.address.rpartition(":")[0].strip("[]"), node_id=self.node_id,
            state_dir=self.state_dir, cluster_tls=self.cluster.tls,
            on_tls_refused=lambda peer, why: self.record_cluster_refusal(peer, "tls_handshake", why))
        self.port, self._redirect = listening.port, listening.redirect
        log.info("node %s serving the OpenAI API and status page on %s/ (backend %s)",
                 self.node_id, listening.api_url, self.backend.summary())
        await self.files.start()
        await self.estimate_models()
        await self.cluster.start(self.address)
        self._tasks.append(asyncio.create_task(self.keys.run(), name="key sync"))
        self._tasks.append(asyncio.create_task(self._refresh_devices(), name="device refresh"))
        self._tasks.append(asyncio.create_task(self.observe.run(), name="history"))
        self.drainer.announce()
        self._tasks.append(asyncio.create_task(self.drainer.run(), name="drain"))
        from aivailable.files import progress

        if progress.enabled():
            self._tasks.append(asyncio.create_task(self._load_bars(progress.LoadBars()), name="load progress"))

    def record_cluster_refusal(self, peer: str, reason: str, detail: str) -> None:
        """Cluster traffic from/to `peer` was refused: counted with the transport's rejections, logged."""
        if self.cluster.transport is not None:
            self.cluster.transport.note_rejection(peer, reason, detail)
        else:
            log.warning("refused cluster traffic from %s before the cluster started: %s (%s)", peer, reason, detail)

    async def _load_bars(self, bars) -> None:
        """Terminal spinners for model loads (only when stderr is a TTY)."""
        try:
            while True:
                bars.update({k: f"loading {h.model} on {'+'.join(h.assignment.device_ids)}"
                             for k, h in self.manager.workers.items() if h.state in ("starting", "loading")})
                await asyncio.sleep(0.5)
        finally:
            bars.close()

    async def _refresh_devices(self, interval_s: float = 2.0) -> None:
        """Re-measure real GPUs' VRAM (simulated ones: what the workers claim) for the status page."""
        while True:
            await asyncio.sleep(interval_s)
            claims = {d: int(v) for d, v in self.manager.vram_claims().items()}
            self.inventory = await asyncio.to_thread(self.inventory.refresh, claims)
            self.manager.measure_vram({d.id: dict(d.processes) for d in self.inventory.devices if d.processes})
            await self.estimate_models()  # models the cluster catalog named since, whose file is here

    async def stop(self, handover_s: float = leave.HANDOVER_TIMEOUT_S) -> None:
        """Leave gracefully (aivailable.leave): hand models over, leave the cluster, drain, stop workers."""
        log.info("node %s shutting down: handing its models over, then draining requests (signal again to stop "
                 "at once)", self.node_id)
        failed = await run_steps([
            ("the hand-over of this node's models", lambda: leave.hand_over(self, handover_s)),
            ("background tasks", self._cancel_tasks),
            ("leaving the cluster", self.cluster.leave),
            ("the file service", self.files.stop),
            ("draining HTTP requests", self._close_http),
            ("the cluster transport", self.cluster.close),
            ("the llama.cpp workers", self.manager.close),
            ("the local cache", self.cache.close),
        ], log)
        if failed:
            log.error("node %s stopped with %d failed step(s): %s (see the errors above)", self.node_id,
                      len(failed), "; ".join(failed))

    def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def _close_http(self) -> None:
        if self._redirect is not None:
            await self._redirect.cleanup()
        if self._runner is not None:
            t0 = time.monotonic()
            await self._runner.cleanup()  # stops listening; requests in flight finish (DRAIN_GRACE_S)
            log.info("requests drained in %.1f s; stopping workers", time.monotonic() - t0)


async def run_node(settings: Settings, *, ready_file: Path | None = None) -> int:
    """Run until SIGINT/SIGTERM; return the process exit code."""
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except BaseException:
        await node.stop()  # close the port and whatever started before the failure
        raise
    if ready_file is not None:
        ready_file.write_text(str(node.port))
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second signal takes its default action: stop at once
    await node.stop()
    return 0

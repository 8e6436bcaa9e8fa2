"""Runs the node's share of the placement: one worker process per assigned replica.

`reconcile(assignments)` is idempotent: it starts what is missing, stops what is no longer wanted
and leaves the rest alone. One owner task (the node's event loop) drives it; no locks beyond the
one that keeps model loads one at a time (two loads racing for one GPU is how others double-book).
A worker that dies is restarted with exponential backoff; its state and last reason stay visible.
How a worker process is started is injected (`spawn`, engine/spawn.py), so tests can run another worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiohttp

from aivailable.engine.spawn import ModuleSpawn, Spawn
from aivailable.engine.spec import SamplingDefaults, WorkerSpec

log = logging.getLogger("aivailable.manager")

State = Literal["starting", "loading", "ready", "failed", "stopping", "stopped"]


@dataclass(frozen=True)
class ManagerConfig:
    """Timings of the worker supervisor (seconds)."""

    backoff_initial_s: float = 1.0
    """First restart delay after a crash; doubles per consecutive failure."""
    backoff_max_s: float = 60.0
    """Cap of the restart delay; a replica keeps being retried at this pace."""
    load_timeout_s: float = 600.0
    """A worker that has not reported ready by then is killed and counted as failed."""
    health_interval_s: float = 2.0
    stop_grace_s: float = 10.0
    """SIGTERM, then SIGKILL after this long."""

    @classmethod
    def local(cls) -> ManagerConfig:
        """Fast restarts for tests and single-machine demos."""
        return cls(backoff_initial_s=0.5, backoff_max_s=5.0, health_interval_s=1.0, stop_grace_s=5.0)


@dataclass(frozen=True)
class Assignment:
    """One replica this node must run: a model on given local devices."""

    model: str
    path: str
    device_ids: tuple[str, ...]
    n_ctx: int
    visible_env: tuple[tuple[str, str], ...] = ()
    simulated: bool = True
    embedding: bool = False
    parallel: int = 1
    max_queue: int = 16
    chat_format: str | None = None
    tensor_split: tuple[float, ...] | None = None
    max_tokens_default: int | None = None
    max_tokens_ceiling: int | None = None
    sampling: tuple[tuple[str, float], ...] = ()
    """The model's sampling defaults (engine.spec.SamplingDefaults fields), as hashable pairs."""
    mmproj: str | None = None
    """The multimodal projector file (engine/media.py), or None."""
    kv_cache_type: str = "f16"
    """How the worker stores K and V (a change restarts the worker: the context is rebuilt)."""
    vram_estimate_mib: float = field(default=0.0, compare=False)
    """Not part of identity: a better estimate must not restart a running worker."""

    @property
    def key(self) -> str:
        return f"{self.model}@{'+'.join(self.device_ids)}"


@dataclass
class WorkerHandle:
    """The supervisor's view of one replica's worker process."""

    assignment: Assignment
    socket: str
    state: State = "starting"
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    next_start_at: float = 0.0
    vram_mib: float = 0.0
    load_s: float | None = None
    """Seconds from starting the worker process to its ready report, at its last load."""
    load_info: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    outstanding: int = 0
    session: aiohttp.ClientSession | None = None
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None

    @property
    def model(self) -> str:
        return self.assignment.model

    def view(self) -> dict:
        """JSON-able state for /api/cluster and the status page."""
        return {"key": self.assignment.key, "model": self.model, "gpus": list(self.assignment.device_ids),
                "state": self.state, "reason": self.reason, "pid": self.pid, "restarts": self.restarts,
                "vram_mib": round(self.vram_mib, 1), "simulated": self.assignment.simulated,
                "outstanding": self.outstanding, "queued": self.health.get("queued", 0),
                "slots": self.assignment.parallel, "kv_cache_type": self.assignment.kv_cache_type,
                "kv_cache_mib": self.load_info.get("kv_mib"),
                "requests": self.health.get("requests", 0),
                "cancelled": self.health.get("cancelled", 0),
                "completion_tokens": self.health.get("completion_tokens", 0),
                "prompt_tokens": self.health.get("prompt_tokens", 0),
                "cached_tokens": self.health.get("cached_tokens", 0),
                "tokens_per_s": self.health.get("tokens_per_s", 0.0),
                "kv_cells_used": self.health.get("kv_cells_used"), "kv_cells_total": self.health.get("kv_cells_total"),
                "load_s": None if self.load_s is None else round(self.load_s, 3),
                "chat_template": self.load_info.get("chat_template"),
                "uptime_s": round(time.monotonic() - self.ready_at, 1) if self.ready_at else None}


def default_threads(cpus: set[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """CPU threads for a worker: the physical cores this process may run on.

    llama-cpp-python defaults to half the logical CPUs; decode is memory-bound, so one
    thread per physical core is best, and hyper-threads sharing a core only add contention.
    Cores are counted from sysfs topology (`core_cpus_list`, older kernels
    `thread_siblings_list`); where that is unreadable every allowed CPU counts as a core.
    """
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            cpus = set(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in cpus:
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                with open(f"{sysfs}/cpu{cpu}/topology/{name}") as f:
                    cores.add(f.read().strip())
                break
            except OSError:
                continue
        else:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


class WorkerManager:
    """Supervises worker processes; `reconcile` is the only way to change what runs."""

    def __init__(self, config: ManagerConfig | None = None, *, socket_dir: str | None = None,
                 n_threads: int | None = None, spawn: Spawn | None = None):
        self.config = config or ManagerConfig()
        self._spawn: Spawn = spawn or ModuleSpawn()
        """Starts each worker process (engine/spawn.py; default `python -m aivailable.engine.worker`)."""
        self.workers: dict[str, WorkerHandle] = {}
        self._socket_dir = socket_dir or tempfile.mkdtemp(prefix="aivailable-")
        self._load_lock = asyncio.Lock()
        self._n_threads = n_threads or default_threads()
        self._closing = False
        self._health_task: asyncio.Task | None = None
        self.on_health: Callable[[WorkerHandle], None] | None = None
        """Called after each successful health poll of a worker (the node folds its latency reports)."""

    # -- desired state -------------------------------------------------------------------------
    async def reconcile(self, assignments: list[Assignment]) -> None:
        """Make the running workers match `assignments` (idempotent)."""
        wanted = {a.key: a for a in assignments}
        for key in [k for k in self.workers if k not in wanted]:
            await self._stop(self.workers.pop(key), reason="no longer assigned")
        for key, a in wanted.items():
            h = self.workers.get(key)
            if h is not None and h.assignment != a:
                await self._stop(self.workers.pop(key), reason="assignment changed")
                h = None
            if h is None:
                sock = os.path.join(self._socket_dir, f"w{len(key)}-{abs(hash(key)) % 10**8}.sock")
                h = WorkerHandle(assignment=a, socket=sock)
                self.workers[key] = h
                h.task = asyncio.create_task(self._supervise(h), name=f"worker {key}")
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="worker health")

    def ready(self, model: str) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.model == model and h.state == "ready"]

    def replicas(self, model: str) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.model == model]

    def vram_claims(self) -> dict[str, float]:
        """MiB claimed per local device id by workers that run or are loading (never double-book)."""
        claims: dict[str, float] = collections.defaultdict(float)
        for h in self.workers.values():
            if h.state in ("stopped",):
                continue
            ids = h.assignment.device_ids
            need = h.vram_mib or h.assignment.vram_estimate_mib
            for d in ids:
                claims[d] += need / max(1, len(ids))
        return dict(claims)

    def measure_vram(self, processes: Mapping[str, Mapping[int, int]]) -> None:
        """Take each ready worker's VRAM from what the driver reports for its process (`processes`: local
        device id -> {pid: MiB}), where it reports the worker on every one of its devices. This counts
        the CUDA context and library workspaces that llama.cpp's own buffer sizes leave out (about
        0.5 GiB per process on an H100, bench/results/gpu_h100.json)."""
        for h in self.workers.values():
            if h.state != "ready" or h.pid is None or h.assignment.simulated:
                continue
            found = [processes.get(d, {}).get(h.pid) for d in h.assignment.device_ids]
            if found and all(f for f in found):
                h.vram_mib = float(sum(found))

    # -- supervision ---------------------------------------------------------------------------
    def _stopping(self, h: WorkerHandle) -> bool:
        return self._closing or h.state in ("stopping", "stopped")

    async def _supervise(self, h: WorkerHandle) -> None:
        # Every await is followed by a stop check: cancelling this task is not enough on its own, because
        # asyncio.wait_for on Python 3.11 may swallow a cancellation that arrives as its inner await
        # completes; a supervisor that missed it would restart a worker nobody tracks, and `_stop` (and
        # with it every later reconcile) would wait for it forever.
        cfg = self.config
        while not self._stopping(h):
            delay = h.next_start_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopping(h):
                break
            async with self._load_lock:
                if self._stopping(h):
                    break
                ok = await self._start(h)
            if self._stopping(h):
                break  # stopped while loading: not a failure, never restarted
            if ok:
                code = await h.proc.wait()
                if self._stopping(h):
                    break
                tail = " | ".join(list(h.stderr_tail)[-3:])
                h.reason = f"worker exited with code {code} (pid {h.pid}) {tail}".strip()
                log.warning("model %s: %s; restarting", h.assignment.key, h.reason)
                h.restarts += 1
            h.state = "failed"
            h.ready_at = None
            await self._close_session(h)
            h.failures += 1
            backoff = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (h.failures - 1))
            h.next_start_at = time.monotonic() + backoff

    async def _start(self, h: WorkerHandle) -> bool:
        a = h.assignment
        spec = WorkerSpec(model=a.model, path=a.path, n_ctx=a.n_ctx, parallel=a.parallel,
                          n_threads=self._n_threads, embedding=a.embedding, device_ids=a.device_ids,
                          simulated=a.simulated, tensor_split=a.tensor_split, chat_format=a.chat_format,
                          max_queue=a.max_queue, max_tokens_default=a.max_tokens_default,
                          max_tokens_ceiling=a.max_tokens_ceiling, sampling=SamplingDefaults(**dict(a.sampling)),
                          mmproj=a.mmproj, socket=h.socket, kv_cache_type=a.kv_cache_type)
        env = {**os.environ, **dict(a.visible_env)}
        h.state, h.started_at, h.reason = "loading", time.monotonic(), ""
        log.info("model %s: starting worker (ctx %d, KV %s, %s)", a.key, a.n_ctx, a.kv_cache_type,
                 "simulated GPU, runs on CPU" if a.simulated else f"GPU {','.join(a.device_ids)}")
        try:
            h.proc = await self._spawn(spec, env)
        except Exception as exc:  # an injected spawn may fail any way; the replica is retried with backoff
            h.reason = f"cannot start the worker process: {exc!r}"
            log.error("model %s: %s", a.key, h.reason)
            return False
        h.pid = h.proc.pid
        pump = asyncio.create_task(self._pump_stderr(h, h.proc))
        try:
            line = await asyncio.wait_for(h.proc.stdout.readline(), self.config.load_timeout_s)
        except TimeoutError:
            h.reason = f"did not load within {self.config.load_timeout_s:.0f}s"
            self._kill(h)
            return False
        try:
            event = json.loads(line) if line else {}
        except json.JSONDecodeError:
            event = {}
        if self._stopping(h):  # stopped while it loaded: `_stop` may already have gone past this process
            self._kill(h)
            await h.proc.wait()
            return False
        if event.get("event") != "ready":
            await h.proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pump, 2)  # the last stderr lines say why it died
            h.reason = event.get("reason") or (
                f"worker exited with code {h.proc.returncode} while loading: "
                + " | ".join(list(h.stderr_tail)[-3:]))
            log.error("model %s: load failed: %s", a.key, h.reason)
            return False
        h.load_info = event
        measured = (event.get("gpu_mib") or 0) if not a.simulated else (
            (event.get("host_mib") or 0) + (event.get("gpu_mib") or 0))
        h.vram_mib = measured or a.vram_estimate_mib
        # Uncapped (the worker's own queue bounds the load and answers 429); no cookie jar, as for peers.
        h.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=h.socket, limit=0),
                                          cookie_jar=aiohttp.DummyCookieJar(),
                                          timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        h.state, h.ready_at, h.failures = "ready", time.monotonic(), 0
        h.load_s = h.ready_at - h.started_at
        log.info("model %s: ready in %.1fs (pid %d, %.0f MiB, chat template %s)", a.key,
                 h.ready_at - h.started_at, h.pid, h.vram_mib, event.get("chat_template"))
        return True

    async def _pump_stderr(self, h: WorkerHandle, proc: asyncio.subprocess.Process) -> None:
        wlog = logging.getLogger(f"aivailable.worker.{h.model}")
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                h.stderr_tail.append(text[-300:])
                wlog.info("%s", text)

    async def _health_loop(self) -> None:
        while not self._closing:
            for h in list(self.workers.values()):
                if h.state == "ready" and h.session is not None:
                    try:
                        async with h.session.get("http://worker/health",
                                                 timeout=aiohttp.ClientTimeout(total=2)) as r:
                            h.health = await r.json()
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        continue  # a dead worker is noticed by _supervise through proc.wait()
                    if self.on_health is not None:
                        try:
                            self.on_health(h)
                        except Exception:  # observability must not stop health polling
                            log.exception("model %s: handling its health report failed", h.assignment.key)
            await asyncio.sleep(self.config.health_interval_s)

    # -- stopping ------------------------------------------------------------------------------
    def _kill(self, h: WorkerHandle) -> None:
        if h.proc is not None and h.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.proc.pid, signal.SIGKILL)

    async def _stop(self, h: WorkerHandle, *, reason: str) -> None:
        log.info("model %s: stopping worker (%s)", h.assignment.key, reason)
        h.state = "stopping"
        if h.task is not None:
            h.task.cancel()
        if h.proc is not None and h.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                h.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(h.proc.wait(), self.config.stop_grace_s)
            except TimeoutError:
                self._kill(h)
                await h.proc.wait()
        if h.task is not None:
            # Bounded: a stop must never hang the reconcile that asked for it.
            _, pending = await asyncio.wait({h.task}, timeout=self.config.stop_grace_s)
            if pending:
                log.error("model %s: its supervisor did not stop within %.0f s; killing its worker",
                          h.assignment.key, self.config.stop_grace_s)
            self._kill(h)  # whatever it may have started meanwhile
        await self._close_session(h)
        h.state = "stopped"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(h.socket)

    @staticmethod
    async def _close_session(h: WorkerHandle) -> None:
        if h.session is not None:
            await h.session.close()
            h.session = None

    async def close(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after the grace period)."""
        self._closing = True
        if self._health_task:
            self._health_task.cancel()
        await asyncio.gather(*(self._stop(h, reason="node shutting down") for h in self.workers.values()))
        self.workers.clear()

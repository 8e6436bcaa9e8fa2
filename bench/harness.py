"""What the benchmarks share: node processes and clusters, free ports, waiting, the demo model, machine facts,
percentiles and writing results.

Node processes come from tests/nodeproc.py (the tests start nodes the same way): ``start_node``, ``serving``,
``start_cluster``, ``NodeProc``, ``free_port``, ``get_json``. ``TwoNodes`` is the two-node cluster with one
replica that proxy.py, frontend.py and anynode.py measure.

Results: ``write_results(name, data, label=None)`` writes ``bench/results/NAME.json``, or
``bench/results/NAME.LABEL.json`` with a run label, adding the machine's facts (unless ``data`` has its own
"machine"), the command-line arguments and a "finished" UTC timestamp. Every benchmark takes ``--label``
(``add_output_args``); an explicit ``--out PATH`` still wins.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import http.client
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.nodeproc import (  # noqa: E402, F401  (re-exported for the benchmarks)
    NodeProc,
    free_port,
    get_json,
    ready_nodes,
    serving,
    start_cluster,
    start_node,
)

RESULTS_DIR = REPO / "bench" / "results"
DEMO_CACHE = Path(tempfile.gettempdir()) / "aivailable-bench-demo"
"""Where the demo model is assembled once (about 250 MB) and reused; demo_model_path checks its sha256."""


# -- the demo model ------------------------------------------------------------------------------------------
def demo_model(cache: Path | None = None) -> Path:
    """The demo GGUF (Gemma 3 270M), assembled under `cache` (default: one shared folder in the temp dir)."""
    from aivailable.demo import demo_model_path

    return demo_model_path(cache or DEMO_CACHE, progress=False)


# -- machine facts -------------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(**extra: Any) -> dict[str, Any]:
    """Python, platform, architecture, CPU count (and what the caller adds, e.g. loadavg_start)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), **extra}


# -- figures -------------------------------------------------------------------------------------------------
def pct(xs: Sequence[float | None], q: float, method: str = "linear") -> float | None:
    """q-th percentile (0-100); None values are left out, None for no values. `method` "linear" interpolates
    between the closest ranks (statistics.quantiles' "inclusive"); "nearest" takes the value at the rounded
    rank, (n - 1) * q / 100; "floor" the value at index floor(n * q / 100) (chaos.py's figures)."""
    s = sorted(x for x in xs if x is not None)
    if not s:
        return None
    if method == "floor":
        return s[min(len(s) - 1, int(q / 100 * len(s)))]
    k = (len(s) - 1) * q / 100.0
    if method == "nearest":
        return s[min(len(s) - 1, max(0, round(k)))]
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are printed with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- waiting -------------------------------------------------------------------------------------------------
def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy (returned); connection and parse errors count as not
    yet. TimeoutError names `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
            last = pred()
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout:.0f}s (last: {last})")


def ready_holders(view: dict, model: str) -> list[str]:
    """Nodes with a ready replica of `model` in a /api/cluster view."""
    return [r["node"] for m in view["models"] if m["name"] == model
            for r in m["replicas"] if r["state"] == "ready"]


def ours(pid: int, marker: str) -> bool:
    """Whether `pid` is still a process this benchmark started (its command line names `marker`, e.g. our
    temp dir)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


# -- clusters -----------------------------------------------------------------------------------------------
def start_joined(tmp: Path, config: Path, secret: str, gpus: dict[int, str], env: dict[str, str] | None = None,
                 healthy_s: float = 60.0, extra: tuple[str, ...] = ()) -> dict[str, NodeProc]:
    """Nodes n<i> on 127.0.0.<i>, one per entry of `gpus` (i: its --simulate-gpu), each but the first joining
    the first; healthy when returned. The caller stops them (on error they are killed)."""
    ports = {i: free_port(f"127.0.0.{i}") for i in gpus}
    first = min(gpus)
    nodes: dict[str, NodeProc] = {}
    try:
        for i in gpus:
            args = ["--config", str(config), "--simulate-gpu", gpus[i], "--cluster-secret", secret,
                    "--node-id", f"n{i}", *extra]
            if i != first:
                args += ["--join", f"127.0.0.{first}:{ports[first]}"]
            nodes[f"n{i}"] = start_node(tmp, *args, host=f"127.0.0.{i}", port=ports[i], env=env, name=f"n{i}")
        for n in nodes.values():
            n.wait_healthy(healthy_s)
    except BaseException:
        for n in nodes.values():
            with contextlib.suppress(Exception):
                n.kill_group()
        raise
    return nodes


class TwoNodes:
    """n1 on 127.0.0.1 and n2 on 127.0.0.2 joining it; one model with max_replicas = 1."""

    SECRET = "bench-proxy-secret-0123456789abcdef"

    def __init__(self, tmp: Path, model_path: Path, env: dict[str, str], ctx: int = 512, parallel: int | None = None,
                 max_queue: int = 64, model: str = "bench", extra: tuple[str, ...] = ()):
        self.tmp, self.env, self.model, self.extra = tmp, env, model, extra
        self.cfg = tmp / "models.toml"
        self.cfg.write_text(f'[[models]]\nname = "{model}"\npath = "{model_path}"\nctx = {ctx}\n'
                            f"max_replicas = 1\nmax_queue = {max_queue}\n"
                            + (f"parallel = {parallel}\n" if parallel else ""))
        self.nodes: dict[str, NodeProc] = {}

    def start(self, timeout: float = 180.0) -> None:
        self.nodes = start_joined(self.tmp, self.cfg, self.SECRET, {i: f"card{i}:2000" for i in (1, 2)}, self.env,
                                  extra=self.extra)

        def settled():
            views = [n.cluster() for n in self.nodes.values()]
            ok = all({x["id"] for x in v["nodes"] if x["state"] == "alive"} == {"n1", "n2"} for v in views)
            hs = [ready_holders(v, self.model) for v in views]
            # Both views agree on exactly one ready replica: the non-holder can route to it.
            return ok and all(len(h) == 1 for h in hs) and hs[0] == hs[1] and hs[0]

        self.holder_id = wait_for(settled, timeout, "two nodes alive and the model ready in both views")[0]

    @property
    def holder(self) -> NodeProc:
        return self.nodes[self.holder_id]

    @property
    def peer(self) -> NodeProc:
        return next(n for k, n in self.nodes.items() if k != self.holder_id)

    def worker_socket(self) -> str:
        socks = glob.glob(str(self.holder.state_dir / "run" / "*.sock"))
        if len(socks) != 1:
            raise RuntimeError(f"expected one worker socket in {self.holder.state_dir / 'run'}, "
                               f"found {socks}")
        return socks[0]

    def worker_pids(self) -> list[int]:
        pids = []
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                for m in n.cluster()["models"]:
                    pids += [r["pid"] for r in m["replicas"] if r.get("pid")]
        return sorted(set(pids))

    def worker_pid(self) -> int:
        reps = [r for m in self.holder.cluster()["models"] for r in m["replicas"]
                if r["node"] == self.holder_id and r.get("pid")]
        return reps[0]["pid"]

    def stop(self) -> None:
        pids = self.worker_pids()
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.stop(timeout=15)
        for n in self.nodes.values():  # whatever is left of the group
            with contextlib.suppress(Exception):
                n.kill_group()
        for pid in pids:  # workers run in their own sessions; they exit on stdin EOF, make sure
            if ours(pid, str(self.tmp)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # the worker leads its own session/group


# -- results -------------------------------------------------------------------------------------------------
def add_output_args(ap: argparse.ArgumentParser, name: str) -> None:
    """`--label L` (write bench/results/NAME.L.json) and `--out PATH` (write exactly there)."""
    ap.add_argument("--label", default=None,
                    help=f"run label: write bench/results/{name}.LABEL.json instead of {name}.json")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"write the results to this file (default: bench/results/{name}[.LABEL].json)")


def results_path(name: str, label: str | None = None) -> Path:
    return RESULTS_DIR / (f"{name}.{label}.json" if label else f"{name}.json")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """Where this run writes: --out if given, else bench/results/NAME[.LABEL].json."""
    out = getattr(args, "out", None)
    return Path(out) if out else results_path(name, getattr(args, "label", None))


def write_results(name: str, data: dict, label: str | None = None, *, args: argparse.Namespace | None = None,
                  out: Path | None = None, indent: int = 1) -> Path:
    """Write `data` as JSON to `out`, or bench/results/NAME[.LABEL].json (label and out default to those in
    `args`), with "machine" (when `data` has none), "args", "label" and "finished" added; the path written."""
    if args is not None:
        label = label or getattr(args, "label", None)
        out = out or getattr(args, "out", None)
    path = Path(out) if out else results_path(name, label)
    full = dict(data)
    full.setdefault("machine", machine())
    if args is not None:
        full["args"] = {k: v for k, v in vars(args).items() if not callable(v)}
    if label:
        full["label"] = label
    full["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=indent, default=str) + "\n")
    return path

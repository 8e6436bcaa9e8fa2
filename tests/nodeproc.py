"""Start real node processes for tests: own process group, own state dir, free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port P on `host` with P and P + 1 free: a node listens on both (API, and TLS cluster port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free pair of adjacent ports on {host}")


def get_json(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> dict:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
        return json.load(r)


@dataclass
class NodeProc:
    """A running `aivailable up` process."""

    proc: subprocess.Popen
    host: str
    port: int
    state_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    scheme: str = "http"
    """"https" for a node started with --tls auto or --tls-cert/--tls-key."""
    ca: Path | None = None
    """The CA its HTTPS certificate chains to, once the test knows it; until then the helpers' own polling
    (health, cluster view) does not verify it. Tests check verification with clients of their own."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def context(self) -> ssl.SSLContext | None:
        """For urllib requests to this node: None over HTTP; with HTTPS, trusting `ca` (unverified if unset)."""
        if self.scheme != "https":
            return None
        if self.ca is not None:
            return ssl.create_default_context(cafile=str(self.ca))
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return ctx

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def cluster(self) -> dict:
        return get_json(self.url + "/api/cluster", context=self.context)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                if get_json(self.url + "/health", timeout=2, context=self.context)["status"] == "ok":
                    return
            time.sleep(0.1)
        raise TimeoutError(f"node not healthy after {timeout}s:\n{self.log()[-3000:]}")

    def wait_model(self, name: str, state: str = "ready", timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                for m in self.cluster()["models"]:
                    if m["name"] == name:
                        last = m
                        if m["state"] == state:
                            return m
            time.sleep(0.2)
        raise TimeoutError(f"model {name} not {state} after {timeout}s (last {last}):\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL the node and every worker it started (they are in their own groups)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def start_node(tmp: Path, *args: str, host: str = "127.0.0.1", port: int | None = None,
               env: dict[str, str] | None = None, name: str = "node",
               preexec_fn: Callable[[], None] | None = None, prefix: tuple[str, ...] = (),
               scheme: str = "http") -> NodeProc:
    """Start `python -m aivailable up` with `args` on a free port; the caller stops it. `preexec_fn` runs in
    the child before it starts (e.g. to lower its resource limits); `prefix` goes before the command (e.g.
    `ip netns exec NS`, with an explicit `port`); `scheme` "https" for a node whose `args` turn TLS on."""
    port = port or free_port(host)
    state = tmp / f"{name}-state"
    state.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"{name}.log"
    cmd = [*prefix, sys.executable, "-m", "aivailable", "up", "--host", host, "--port", str(port),
           "--state-dir", str(state), "--no-mdns", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "AIVAILABLE_PROFILE": "local", **(env or {})}
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                start_new_session=True, preexec_fn=preexec_fn)
    return NodeProc(proc, host, port, state, log_path, list(args), scheme)


@contextlib.contextmanager
def serving(tmp: Path, *args: str, models: tuple[str, ...] = (), **kw) -> Iterator[NodeProc]:
    """A node that is healthy and has every model in `models` ready; stopped (SIGTERM) on exit."""
    n = start_node(tmp, *args, **kw)
    try:
        n.wait_healthy()
        for m in models:
            n.wait_model(m)
        yield n
    finally:
        n.stop()


def ready_nodes(n: NodeProc) -> set[str]:
    """Node ids that hold a ready replica of any model, as `n` sees the cluster."""
    return {r["node"] for m in n.cluster()["models"] for r in m["replicas"] if r["state"] == "ready"}


def start_cluster(tmp: Path, config: Path, secret: str, count: int = 3, gpu_mib: int = 2048,
                  extra: tuple[str, ...] = (), timeout: float = 180.0) -> list[NodeProc]:
    """`count` nodes n1..nN on 127.0.0.1..N, each with one simulated GPU, joined through n1, healthy, and a
    ready replica on every node as every node sees it. The caller stops them (on error they are killed)."""
    ports = {i: free_port(f"127.0.0.{i}") for i in range(1, count + 1)}
    nodes: list[NodeProc] = []
    want = {f"n{i}" for i in ports}
    try:
        for i in ports:
            args = ["--config", str(config), "--simulate-gpu", f"g{i}:{gpu_mib}", "--cluster-secret", secret,
                    "--node-id", f"n{i}", *extra]
            if i > 1:
                args += ["--join", f"127.0.0.1:{ports[1]}"]
            nodes.append(start_node(tmp, *args, host=f"127.0.0.{i}", port=ports[i], name=f"n{i}"))
        for n in nodes:
            n.wait_healthy(120)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                if all(ready_nodes(n) == want for n in nodes):
                    return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} ready replicas: {nodes[0].cluster()['models']}")
            time.sleep(0.5)
    except BaseException:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.kill_group()
        raise

"""Frontend overhead, side by side: our non-holding node vs HAProxy vs LiteLLM proxy in front of one upstream.

A two-node cluster (bench/proxy.py's ``TwoNodes``: real ``aivailable up`` processes on 127.0.0.1 and
127.0.0.2, one model with ``max_replicas = 1``) gives the common upstream: the **holder** node's API, which
serves the model from its local worker. The same non-streamed ``/v1/chat/completions`` request is sent four
ways, each by bench/loadgen.py (a lean asyncio HTTP/1.1 client in a process of its own, closed loop,
kept-alive connections):

- ``direct``: straight to the holder's API (the floor);
- ``aivailable``: to the other node, which does not hold the model and proxies to the holder (what a client
  entering the cluster anywhere pays);
- ``haproxy``: HAProxy (``mode http``, keep-alive both ways, ``http-reuse always``, default threads) with
  the holder as its only server;
- ``litellm``: the LiteLLM proxy (``model: openai/bench``, ``api_base`` = the holder, 1 worker) run by the
  python of a separate virtual environment.

Per upstream (``stub``: the fast stub worker, bench/stub_worker.py, no model time; ``real``: the Gemma 3
270M model on llama.cpp, greedy, a few tokens) and concurrency level (default 1, 16, 64), the targets are
measured in rounds whose order rotates, so drift on this shared machine hits all of them alike. Reported
per target: latency p50/p99 and requests/s (closed loop at that concurrency, i.e. the most the chain
sustains with that many clients), ``added`` = target - direct at p50 and p99, and the CPU the frontend
process itself used per request (HAProxy: its process; LiteLLM: its process tree; ours: the entering node;
``direct``: the holder node), less what it uses idle (measured for 2 s first, recorded as ``idle_cpu_ms_per_s``).
The load generator's own floor (against bench/loadgen.py's ``fixed`` server) is measured and reported too.

Targets (issue 6), judged on the stub at concurrency 1: ours adds <= 1 ms p50, within 1 ms of HAProxy's
added p50, and >= 5x less than LiteLLM's.

Prerequisites (optional; a missing one is skipped with the reason printed and recorded):

    apt-get install -y haproxy                       # Debian package; or --haproxy PATH
    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
                                                     # never into the project's venv; or --litellm-python PY

    python bench/frontend.py [--levels 1,16,64] [--requests 1500] [--rounds 3] [--skip-real]

About 5-8 minutes on 2 cores. Writes bench/results/frontend.json (settings, machine, tool versions, every
round's raw figures) and prints a table. Every process it starts is in its own process group and is killed
in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.engine import descendants  # noqa: E402
from bench.harness import TwoNodes, free_port, loadavg, pct  # noqa: E402
from bench.proxy import MODEL, cpu_s  # noqa: E402

TARGETS = ("direct", "aivailable", "haproxy", "litellm")
DEFAULT_LITELLM_PYTHON = "/tmp/litellm-venv/bin/python"
ADDED_P50_TARGET_MS = 1.0
HAPROXY_MARGIN_MS = 1.0
LITELLM_FACTOR = 5.0

HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {bind}
    default_backend be
backend be
    server holder {upstream}
"""

LITELLM_CFG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {api_base}
      api_key: none
      timeout: 300
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: {master_key}
"""
LITELLM_KEY = "sk-aivailable-bench-0123456789abcdef"
"""LiteLLM's proxy refuses to start without a master key; the load generator sends it as a bearer token."""


# -- third-party frontends -----------------------------------------------------------------------------------
class Frontend:
    """A started third-party proxy process (own process group) and the URL it listens on."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str, log: Path):
        self.name, self.proc, self.url, self.log = name, proc, url, log

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"not listening on {host}:{port} after {timeout:.0f}s: {log.read_text(errors='replace')[-2000:]}")


def find_haproxy(given: str | None) -> tuple[str | None, str]:
    """(binary, version or why not)."""
    path = given or shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if not path:
        return None, "haproxy not found: install the Debian package with `apt-get install -y haproxy` or pass --haproxy"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    return path, (out.stdout.splitlines() or ["?"])[0]


def launch(name: str, cmd: list[str], host: str, port: int, log: Path, timeout: float,
           env: dict[str, str] | None = None, cwd: Path | None = None) -> Frontend:
    """Start `cmd` in its own process group, logging to `log`; return once it listens on host:port."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    fe = Frontend(name, proc, f"http://{host}:{port}", log)
    try:
        wait_port(host, port, proc, timeout, log)
    except BaseException:
        fe.stop()
        raise
    return fe


def start_haproxy(binary: str, upstream: str, tmp: Path) -> Frontend:
    host, port = "127.0.0.3", free_port("127.0.0.3")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(bind=f"{host}:{port}", upstream=upstream))
    return launch("haproxy", [binary, "-f", str(cfg), "-db"], host, port, tmp / "haproxy.log", 20)


def find_litellm(python: str) -> tuple[str | None, str]:
    """(python, version or why not)."""
    if not Path(python).exists():
        return None, (f"{python} not found: install LiteLLM into a separate venv: python3 -m venv /tmp/litellm-venv "
                      "&& /tmp/litellm-venv/bin/pip install 'litellm[proxy]' (or pass --litellm-python)")
    out = subprocess.run([python, "-c", "import importlib.metadata as m, litellm.proxy.proxy_cli;"
                          "print(m.version('litellm'))"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": ""})
    if out.returncode != 0:
        return None, f"litellm[proxy] is not importable by {python}: {out.stderr.strip()[-300:]}"
    return python, f"litellm {out.stdout.strip()}"


def start_litellm(python: str, upstream: str, tmp: Path) -> Frontend:
    host, port = "127.0.0.4", free_port("127.0.0.4")
    cfg = tmp / "litellm.yaml"
    cfg.write_text(LITELLM_CFG.format(model=MODEL, api_base=f"{upstream}/v1", master_key=LITELLM_KEY))
    env = {**os.environ, "PYTHONPATH": "", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    env.pop("DATABASE_URL", None)
    code = "import sys; from litellm.proxy.proxy_cli import run_server; sys.exit(run_server())"
    cmd = [python, "-c", code, "--config", str(cfg), "--host", host, "--port", str(port), "--num_workers", "1"]
    return launch("litellm", cmd, host, port, tmp / "litellm.log", 180, env=env, cwd=tmp)


# -- measurement ---------------------------------------------------------------------------------------------
def loadgen(url: str, body: dict, concurrency: int, requests: int, warmup: int, timeout: float,
            headers: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.loadgen", "run", "--url", url + "/v1/chat/completions",
           "--body", json.dumps(body), "--concurrency", str(concurrency), "--requests", str(requests),
           "--warmup", str(warmup), "--timeout", str(timeout)]
    for k, v in (headers or {}).items():
        cmd += ["--header", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout * (requests + 10) + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed on {url}: {out.stderr[-1500:]}")
    return json.loads(out.stdout)


def generator_floor(levels: list[int], requests: int) -> list[dict]:
    """The generator against a server that answers at once: what it can measure at best."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", "fixed"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]  # type: ignore[union-attr]
        rows = []
        for c in levels:
            r = loadgen(f"http://127.0.0.1:{port}", {"model": MODEL}, c, requests, 10, 30)
            r.pop("raw_ms")
            rows.append(r)
        return rows
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def proc_cpu(pids: list[int]) -> float:
    return sum(cpu_s(p) for p in pids)


def idle_cpu(cpu_pids: dict[str, list[int]], seconds: float = 2.0) -> dict[str, float]:
    """CPU seconds per second each target's processes use with no requests (gossip, health checks...)."""
    c0 = {n: proc_cpu(p) for n, p in cpu_pids.items()}
    time.sleep(seconds)
    return {n: (proc_cpu(p) - c0[n]) / seconds for n, p in cpu_pids.items()}


def measure_level(urls: dict[str, str], cpu_pids: dict[str, list[int]], body: dict, concurrency: int,
                  requests: dict[str, int], rounds: int, warmup: int, timeout: float,
                  idle: dict[str, float] | None = None) -> dict:
    """`rounds` rounds, each target once per round in a rotating order; raw latencies pooled per target.

    A frontend's CPU per request is what its processes used during the run, less their `idle` rate."""
    names = list(urls)
    raw: dict[str, list[float]] = {n: [] for n in names}
    rps: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = dict.fromkeys(names, 0)
    samples: dict[str, list[str]] = {n: [] for n in names}
    gen_cpu: dict[str, list[float]] = {n: [] for n in names}
    round_p50: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            pids = cpu_pids.get(n, [])
            c0, t0 = proc_cpu(pids), time.monotonic()
            auth = {"Authorization": f"Bearer {LITELLM_KEY}"} if n == "litellm" else None
            res = loadgen(urls[n], body, concurrency, requests[n], warmup, timeout, auth)
            used = proc_cpu(pids) - c0 - (idle or {}).get(n, 0.0) * (time.monotonic() - t0)
            raw[n] += res["raw_ms"]
            if res["raw_ms"]:
                round_p50[n].append(round(pct(res["raw_ms"], 50), 4))
            rps[n].append(res["rps"])
            errors[n] += res["errors"]
            samples[n] += res["error_samples"]
            gen_cpu[n].append(res["generator_cpu_ms_per_request"])
            if pids:
                cpu[n].append(max(0.0, used) * 1000 / max(1, res["requests"] + warmup * concurrency))
    out: dict = {"concurrency": concurrency, "requests_per_round": {n: requests[n] for n in names}, "rounds": rounds,
                 "targets": {}}
    for n in names:
        xs = raw[n]
        out["targets"][n] = {
            "n": len(xs), "p50_ms": round(pct(xs, 50), 4) if xs else None,
            "p90_ms": round(pct(xs, 90), 4) if xs else None, "p99_ms": round(pct(xs, 99), 4) if xs else None,
            "rps_median": round(statistics.median(rps[n]), 1), "rps_rounds": rps[n], "errors": errors[n],
            "error_samples": samples[n][:3],
            "frontend_cpu_ms_per_request": round(statistics.median(cpu[n]), 4) if cpu[n] else None,
            "generator_cpu_ms_per_request": round(statistics.median(gen_cpu[n]), 4),
            "p50_rounds_ms": round_p50[n],
            "raw_ms": [round(x, 3) for x in xs] if concurrency == 1 else None}  # the file stays small
    d = out["targets"]["direct"]
    for n in names:
        t = out["targets"][n]
        if n != "direct" and t["p50_ms"] is not None:
            t["added_p50_ms"] = round(t["p50_ms"] - d["p50_ms"], 4)
            t["added_p99_ms"] = round(t["p99_ms"] - d["p99_ms"], 4)
            t["rps_vs_direct"] = round(t["rps_median"] / d["rps_median"], 3) if d["rps_median"] else None
    return out


def run_upstream(kind: str, model_path: Path, env: dict[str, str], body: dict, levels: list[int],
                 requests: dict[int, int], rounds: int, timeout: float, tools: dict, tmp_root: Path,
                 litellm_requests: dict[int, int] | None = None, parallel: int | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp_root))
    c = TwoNodes(tmp, model_path, env, ctx=2048 if parallel else 512, parallel=parallel)
    fronts: list[Frontend] = []
    info: dict = {"levels": [], "skipped": {}}
    try:
        c.start()
        h, p = c.holder, c.peer
        upstream = f"{h.host}:{h.port}"
        urls = {"direct": h.url, "aivailable": p.url}
        cpu_pids = {"direct": [h.proc.pid], "aivailable": [p.proc.pid]}
        for name, starter in (("haproxy", start_haproxy), ("litellm", start_litellm)):
            if tools[name][0] is None:
                info["skipped"][name] = tools[name][1]
                continue
            try:
                arg = upstream if name == "haproxy" else f"http://{upstream}"
                fe = starter(tools[name][0], arg, tmp)
            except (RuntimeError, TimeoutError) as exc:
                info["skipped"][name] = f"did not start: {exc}"
                print(f"[{kind}] {name} skipped: {exc}", file=sys.stderr)
                continue
            fronts.append(fe)
            urls[name] = fe.url
            cpu_pids[name] = fe.pids()
        info.update(holder=c.holder_id, entering=next(k for k in c.nodes if k != c.holder_id), urls=urls)
        info["idle_cpu_ms_per_s"] = idle = {n: round(v * 1000, 2) for n, v in idle_cpu(cpu_pids).items()}
        print(f"[{kind}] upstream: holder {c.holder_id} at {upstream}; targets: {', '.join(urls)}; idle CPU ms/s: "
              f"{idle}", flush=True)
        for lvl in levels:
            la = loadavg()
            counts = {n: requests[lvl] for n in urls}
            if "litellm" in counts and litellm_requests:
                counts["litellm"] = litellm_requests[lvl]
            res = measure_level(urls, cpu_pids, body, lvl, counts, rounds, warmup=1 if kind == "real" else 10,
                                timeout=timeout, idle={n: v / 1000 for n, v in idle.items()})
            res["loadavg_before"] = la
            info["levels"].append(res)
            print(level_lines(kind, res), flush=True)
        return info
    except BaseException:
        for n in c.nodes.values():
            with contextlib.suppress(Exception):
                print(f"--- {n.host} log tail ---\n{n.log()[-2000:]}", file=sys.stderr)
        for fe in fronts:
            with contextlib.suppress(Exception):
                print(f"--- {fe.name} log tail ---\n{fe.log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        raise
    finally:
        for fe in fronts:
            fe.stop()
        c.stop()


def level_lines(kind: str, lvl: dict) -> str:
    rows = []
    for n, t in lvl["targets"].items():
        added = (f"{t['added_p50_ms']:+.2f} / {t['added_p99_ms']:+.2f}" if "added_p50_ms" in t else "-")
        cpu = f"{t['frontend_cpu_ms_per_request']:.2f}" if t["frontend_cpu_ms_per_request"] is not None else "-"
        rows.append(f"| {kind} | {lvl['concurrency']} | {n} | {t['p50_ms']:.2f} / {t['p99_ms']:.2f} | {added} | "
                    f"{t['rps_median']:.{0 if t['rps_median'] >= 100 else 1}f} | {cpu} | {t['errors']} |")
    return "\n".join(rows)


TABLE_HEAD = ("| upstream | conc | target | latency p50 / p99 ms | added vs direct p50 / p99 ms | req/s | "
              "frontend CPU ms/req | errors |\n|---|---|---|---|---|---|---|---|")


def judge(stub: dict) -> dict:
    """The issue's targets on the stub at concurrency 1."""
    lvl = next((x for x in stub["levels"] if x["concurrency"] == 1), None)
    if lvl is None:
        return {}
    t = lvl["targets"]
    ours_added = t["aivailable"]["added_p50_ms"]
    out: dict = {"aivailable_added_p50_ms": ours_added, "le_1ms": ours_added <= ADDED_P50_TARGET_MS}
    if "haproxy" in t:
        out["haproxy_added_p50_ms"] = t["haproxy"]["added_p50_ms"]
        out["within_1ms_of_haproxy"] = ours_added - t["haproxy"]["added_p50_ms"] <= HAPROXY_MARGIN_MS
    if "litellm" in t:
        out["litellm_added_p50_ms"] = t["litellm"]["added_p50_ms"]
        ratio = t["litellm"]["added_p50_ms"] / ours_added if ours_added > 0 else float("inf")
        out["litellm_over_ours"] = round(ratio, 1)
        out["ge_5x_lower_than_litellm"] = ratio >= LITELLM_FACTOR
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=1500, help="stub: measured requests per target, level, round")
    ap.add_argument("--litellm-requests", type=int, default=300,
                    help="stub: LiteLLM's requests per level and round (it serves ~50/s here)")
    ap.add_argument("--rounds", type=int, default=3, help="stub: rounds per level (targets rotate each round)")
    ap.add_argument("--real-requests", default="1:20,16:32,64:64",
                    help="real model: LEVEL:REQUESTS per target (one round)")
    ap.add_argument("--max-tokens", type=int, default=4, help="real model: max_tokens per request")
    ap.add_argument("--parallel", type=int, default=8, help="real model: the model's slots (ctx 2048 in all)")
    ap.add_argument("--haproxy", help="haproxy binary (default: from PATH)")
    ap.add_argument("--litellm-python", default=DEFAULT_LITELLM_PYTHON,
                    help="python of the venv that has litellm[proxy] (never the project's)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-stub", action="store_true")
    ap.add_argument("--model-path", type=Path, help="GGUF (default: the demo Gemma 3 270M)")
    harness.add_output_args(ap, "frontend")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: `finally` stops what we started
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    real_req = {int(k): int(v) for k, v in (x.split(":") for x in args.real_requests.split(","))}
    if args.model_path is None:
        args.model_path = harness.demo_model()
    tools = {"haproxy": find_haproxy(args.haproxy), "litellm": find_litellm(args.litellm_python)}
    for name, (path, why) in tools.items():
        print(f"{name}: {why if path else 'SKIPPED: ' + why}", flush=True)
    tmp_root = Path(tempfile.mkdtemp(prefix="aiv-frontend-bench-"))
    result: dict = {"benchmark": "frontend", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "machine": harness.machine(loadavg_start=loadavg()),
                    "tools": {k: v[1] for k, v in tools.items()},
                    "settings": {"levels": levels, "requests": args.requests, "rounds": args.rounds,
                                 "litellm_requests": args.litellm_requests,
                                 "real_requests": real_req, "max_tokens_real": args.max_tokens,
                                 "parallel_real": args.parallel,
                                 "model_path": str(args.model_path)},
                    "targets": {"added_p50_ms_max": ADDED_P50_TARGET_MS, "haproxy_margin_ms": HAPROXY_MARGIN_MS,
                                "litellm_factor_min": LITELLM_FACTOR},
                    "runs": {}}
    base_env = {"AIVAILABLE_PROFILE": "lan", "AIVAILABLE_LOG_LEVEL": "WARNING"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}]}
    if args.skip_stub or args.skip_real:  # one part alone keeps the other's last figures
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(harness.output_path(args, "frontend").read_text())
            keep = "real" if args.skip_real else "stub"
            if keep in old.get("runs", {}):
                result["runs"][keep] = old["runs"][keep]
                if keep == "stub" and "verdict" in old:
                    result["verdict"] = old["verdict"]
    t0 = time.monotonic()
    try:
        result["generator_floor"] = generator_floor(levels, 3000)
        for g in result["generator_floor"]:
            print(f"generator vs fixed server, concurrency {g['concurrency']}: p50 {g['latency_ms']['p50']:.3f} ms, "
                  f"p99 {g['latency_ms']['p99']:.3f} ms, {g['rps']:.0f} req/s, "
                  f"{g['generator_cpu_ms_per_request']:.3f} ms CPU/request", flush=True)
        print(TABLE_HEAD, flush=True)
        if not args.skip_stub:
            env = {**base_env, "AIVAILABLE_WORKER_MODULE": "bench.stub_worker"}
            result["runs"]["stub"] = run_upstream(
                "stub", args.model_path, env, {**chat, "max_tokens": 4}, levels,
                dict.fromkeys(levels, args.requests), args.rounds, 30.0, tools, tmp_root,
                litellm_requests={lv: max(args.litellm_requests, 2 * lv) for lv in levels})
            result["verdict"] = judge(result["runs"]["stub"])
        if not args.skip_real:
            body = {**chat, "max_tokens": args.max_tokens, "temperature": 0.0, "seed": 1}
            result["runs"]["real"] = run_upstream(
                "real", args.model_path, base_env, body, levels, {lv: real_req.get(lv, 2 * lv) for lv in levels},
                1, 300.0, tools, tmp_root, parallel=args.parallel)
    finally:
        result["machine"]["loadavg_end"] = loadavg()
        result["wall_s"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(tmp_root, ignore_errors=True)
        written = harness.write_results("frontend", result, args=args)
    print("\n" + TABLE_HEAD)
    for kind, run in result["runs"].items():
        for lvl in run["levels"]:
            print(level_lines(kind, lvl))
        for name, why in run["skipped"].items():
            print(f"({kind}: {name} skipped: {why})")
    if result.get("verdict"):
        print(f"\ntargets (stub, concurrency 1): {json.dumps(result['verdict'])}")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

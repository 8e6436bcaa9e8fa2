"""Bisect a worker crash on a real GPU before the node-level check (run by bench/gpu_check.sh).

Each step runs in its own process with a time limit, so one native crash cannot hide the others.
By default (what bench/results/gpu_diag_h100.json holds):
  worker-node-spec         `python -m aivailable.engine.worker` with the spec and environment the node gives it
  runner-after-frozenlist  our Runner with `frozenlist._frozenlist` imported first: the crash's cause
                           (libstdc++ loaded before libllama; expected to die of SIGSEGV)
With GPU_DIAG_ALL=1 also the steps that found it (bench/results/gpu_diag_crash_h100.json): direct
llama-cpp-python, our Runner alone and with tensor_split=(1.0,), the worker with 4 threads, and the
manager on asyncio and on uvloop.
A step that dies of a signal (or whose worker child does) is run again under cuda-gdb (the image has no
gdb) for a native backtrace, unless GPU_DIAG_NO_GDB is set. Writes $OUT/gpu_diag.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DIRECT = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_gpu_layers=-1, n_ctx=4096, verbose=False)
out = llm.create_completion("The history of computing began", max_tokens=8, temperature=0)
print("direct ok:", repr(out["choices"][0]["text"]), out["usage"])
"""

RUNNER = """
import json, sys, threading
sys.path.insert(0, sys.argv[3])
if sys.argv[2] == "frozenlist":  # libstdc++ loaded before libllama, as aiohttp's frozenlist does
    import frozenlist._frozenlist
from aivailable.engine.runner import GenParams, Runner
from aivailable.engine.spec import WorkerSpec
split = (1.0,) if sys.argv[2] == "split" else None
spec = WorkerSpec(model="gen", path=sys.argv[1], n_ctx=4096, parallel=2, n_threads=4, device_ids=("nvidia:0",),
                  simulated=False, tensor_split=split, socket="/tmp/unused.sock")
r = Runner(spec)
r.load()
print("load report:", r.load_report)
print("gpu_mib", r.load_report.gpu_mib, "host_mib", r.load_report.host_mib, "fully", r.load_report.fully_offloaded)
parts = []
res = r.generate(r.text_prompt("The history of computing began"), GenParams(max_tokens=8, temperature=0),
                 threading.Event(), lambda text, _logprobs: parts.append(text))
print("runner ok:", repr("".join(parts)), res)
r.close()
"""


WORKER = """
import json, os, subprocess, sys, time, select
spec = json.loads(sys.argv[1])
p = subprocess.Popen([sys.executable, "-m", "aivailable.engine.worker", json.dumps(spec)], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
ready, _, _ = select.select([p.stdout], [], [], 80)
line = p.stdout.readline() if ready else b"(no line within 80 s)"
print("first line:", line.decode()[:600])
p.terminate()
try:
    p.wait(20)
except subprocess.TimeoutExpired:
    p.kill()
print("worker rc", p.returncode)
print("stderr tail:", p.stderr.read().decode()[-2500:])
sys.exit(0 if b'"ready"' in line else 3)
"""

MANAGER = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[2])
from aivailable.engine import devices as devmod
from aivailable.engine.manager import Assignment, WorkerManager
from aivailable.engine.probe_nvml import probe_nvidia
async def main():
    m = WorkerManager()
    env = devmod.device_env(devmod.Backend.CUDA, list(probe_nvidia().devices)[:1])
    a = Assignment(model="gen", path=sys.argv[1], device_ids=("nvidia:0",), n_ctx=16384, parallel=4,
                   simulated=False, visible_env=tuple(env.items()))
    await m.reconcile([a])
    for _ in range(160):
        h = m.workers[a.key]
        if h.state in ("ready", "failed"):
            break
        await asyncio.sleep(0.5)
    print("manager state:", h.state, h.reason, h.load_info)
    await m.close()
    return 0 if h.state == "ready" else 3
if sys.argv[3] == "uvloop":
    import uvloop
    sys.exit(uvloop.run(main()))
sys.exit(asyncio.run(main()))
"""


def worker_env() -> dict[str, str]:
    sys.path.insert(0, str(REPO))
    from aivailable.engine import devices as devmod
    from aivailable.engine.probe_nvml import probe_nvidia

    env = dict(os.environ)
    try:
        devs = list(probe_nvidia().devices)
        env.update(devmod.device_env(devmod.Backend.CUDA, devs[:1]))
    except Exception as exc:  # noqa: BLE001 - diagnostics: say it and go on with the plain environment
        print("device_env unavailable:", type(exc).__name__, exc)
    return env


def run_step(name: str, argv: list[str], env: dict[str, str], timeout: float,
             gdb_argv: list[str] | None = None) -> dict:
    """Run one step; a step that dies of a signal (or whose `gdb_argv` child did) is rerun under cuda-gdb."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                           stdin=subprocess.DEVNULL)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
    step = {"step": name, "rc": rc, "stdout": out[-4000:], "stderr": err[-6000:]}
    print(f"== {name}: rc={rc}\n{out[-1500:]}\n{err[-3000:]}", flush=True)
    crashed = isinstance(rc, int) and (rc < 0 or (gdb_argv is not None and rc != 0))
    if crashed and shutil.which("cuda-gdb") and not os.environ.get("GPU_DIAG_NO_GDB"):
        gdb = ["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info threads", "--args",
               *(gdb_argv or argv)]
        try:
            g = subprocess.run(gdb, capture_output=True, text=True, timeout=timeout + 60, env=env, cwd=REPO,
                               stdin=subprocess.DEVNULL)
            step["backtrace"] = (g.stdout + g.stderr)[-8000:]
        except subprocess.TimeoutExpired as exc:
            step["backtrace"] = f"cuda-gdb timed out: {str(exc.stdout or '')[-4000:]}"
        print(f"-- {name} under cuda-gdb:\n{step['backtrace'][-5000:]}", flush=True)
    return step


def main() -> int:
    model = sys.argv[1]
    env = worker_env()
    env["PYTHONFAULTHANDLER"] = "1"
    pinned = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES",
                                     "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES")}
    print("worker environment:", pinned)
    py = sys.executable
    sys.path.insert(0, str(REPO))
    from aivailable.engine.manager import default_threads

    threads = default_threads()
    print("default_threads:", threads, "of", os.cpu_count(), "CPUs")

    def spec(n_threads: int, n_ctx: int, parallel: int) -> str:
        return json.dumps({"model": "gen", "path": model, "n_ctx": n_ctx, "parallel": parallel,
                           "n_threads": n_threads, "device_ids": ["nvidia:0"], "simulated": False,
                           "socket": f"/tmp/diag-{n_threads}-{n_ctx}.sock"})

    steps = [
        run_step("worker-node-spec", [py, "-c", WORKER, spec(threads, 16384, 4)], env, 120,
                 gdb_argv=[py, "-m", "aivailable.engine.worker", spec(threads, 16384, 4)]),
        run_step("runner-after-frozenlist", [py, "-c", RUNNER, model, "frozenlist", str(REPO)], env, 90),
    ]
    if os.environ.get("GPU_DIAG_ALL"):
        steps += [
            run_step("direct", [py, "-c", DIRECT, model], env, 90),
            run_step("runner", [py, "-c", RUNNER, model, "plain", str(REPO)], env, 90),
            run_step("runner-split", [py, "-c", RUNNER, model, "split", str(REPO)], env, 90),
            run_step("worker-4-threads", [py, "-c", WORKER, spec(4, 16384, 4)], env, 120),
            run_step("manager-asyncio", [py, "-c", MANAGER, model, str(REPO), "asyncio"], env, 120),
            run_step("manager-uvloop", [py, "-c", MANAGER, model, str(REPO), "uvloop"], env, 120),
        ]
    result = {"worker_env": pinned, "steps": steps}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_diag.json").write_text(json.dumps(result, indent=2, default=str))
    return 0 if steps[0]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""GPU check on a real NVIDIA card (run by bench/gpu_check.sh on a lent GPU machine; never in CI).

1. `aivailable doctor` must see the GPU and a CUDA build of llama.cpp.
2. A node started WITHOUT --simulate-gpu loads a generated GGUF fully offloaded.
3. The VRAM the node accounts for the replica is compared with what NVML measures for the worker
   process, and /api/cluster's GPU figures with NVML's (target: within 5%).
4. Decode tokens/s and time to first token through the node's HTTP API vs llama-cpp-python in-process,
   same model, prompt and settings, in one run.
Writes bench/results/gpu_<card>.json (and $OUT/ when set).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import free_port, get_json  # noqa: E402

N_CTX = 4096
GEN_TOKENS = 256
PARALLEL = 4  # slots of the replica the node runs (its model spec asks for this many)
PROMPT = "The history of computing began"


def get(url: str) -> dict:
    return get_json(url, timeout=10)


DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
"""On a machine without a GPU: a simulated GPU and no NVML, to check this script itself before a lease."""


def nvml_snapshot(pid: int | None) -> dict:
    if DRY_RUN:
        return {"name": "dry-run", "total_mib": 1.0, "used_mib": 1.0, "process_mib": None, "processes": {}}
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    procs = {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
    name = pynvml.nvmlDeviceGetName(h)
    return {"name": name if isinstance(name, str) else name.decode(), "total_mib": mem.total / 2**20,
            "used_mib": mem.used / 2**20, "process_mib": procs.get(pid) if pid else None, "processes": procs}


def stream_timing(url: str, body: dict) -> tuple[float, float, int]:
    """(ttft_s, decode tokens/s, completion tokens) of one streamed completion through HTTP."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    n = 0
    usage = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    toks = usage["completion_tokens"] if usage else n
    return first - t0, (toks - 1) / (end - first), toks


def direct_timing(path: str) -> list[tuple[float, float, int]]:
    """The same measure in-process: greedy tokens from Llama.generate, counted as the node's usage counts
    them; first = the first token with text (as over HTTP, where a chunk needs text)."""
    import codecs

    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_gpu_layers=0 if DRY_RUN else -1, verbose=False, seed=1)
    vocab = llm._model.vocab
    out = []
    for _ in range(4):
        llm.reset()
        t0 = time.perf_counter()
        tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first = None
        n = 0
        gen = llm.generate(tokens, temp=0.0, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0)
        for tok in gen:
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            n += 1
            if first is None and decoder.decode(llm.detokenize([tok], special=False)):
                first = time.perf_counter()
            if n >= GEN_TOKENS:
                break
        gen.close()
        end = time.perf_counter()
        out.append((first - t0, (n - 1) / (end - first), n))
    llm.close()
    return out[1:]  # the first run warms up, as the node's first request does


def concurrent_tps(url: str, body: dict, streams: int) -> dict:
    """Aggregate completion tokens/s of `streams` simultaneous streamed requests through the node."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda _: stream_timing(url, body), range(streams)))
    wall = time.perf_counter() - t0
    return {"streams": streams, "tokens": sum(r[2] for r in runs), "wall_s": wall,
            "aggregate_tps": sum(r[2] for r in runs) / wall, "ttft_ms": [r[0] * 1e3 for r in runs]}


def write_results(results: dict) -> None:
    card = (results.get("card") or "gpu").lower().replace(" ", "_")
    path = harness.write_results(f"gpu_{card}", results, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())


def main() -> int:
    model_path = Path(sys.argv[1])
    results: dict = {"card": None, "model": str(model_path), "model_size_mib": model_path.stat().st_size / 2**20}
    try:
        return check(model_path, results)
    except Exception as exc:  # noqa: BLE001 - a failed check still leaves what it measured
        results["error"] = f"{type(exc).__name__}: {exc}"
        print("check failed:", results["error"])
        return 1
    finally:
        write_results(results)


def check(model_path: Path, results: dict) -> int:
    doctor = subprocess.run([sys.executable, "-m", "aivailable", "doctor", "--json"], capture_output=True, text=True,
                            cwd=REPO)
    print(doctor.stdout[-3000:], doctor.stderr[-2000:])
    results["doctor_exit"] = doctor.returncode
    try:
        results["doctor"] = json.loads(doctor.stdout)
    except json.JSONDecodeError:
        results["doctor"] = doctor.stdout[-2000:]
    port = free_port()
    state = Path("/tmp/gpu-node-state")
    log = open("/tmp/gpu-node.log", "wb")  # noqa: SIM115
    config = Path("/tmp/gpu-node.toml")
    config.write_text(f'[[models]]\nname = "gen"\npath = "{model_path}"\nctx = {N_CTX * PARALLEL}\n'
                      f'parallel = {PARALLEL}\n')
    node = subprocess.Popen([sys.executable, "-m", "aivailable", "up", "--host", "127.0.0.1", "--port", str(port),
                             "--state-dir", str(state), "--no-mdns", "--config", str(config),
                             *(["--simulate-gpu", "dry:16000"] if DRY_RUN else [])],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        model = None
        while time.monotonic() < deadline:
            try:
                view = get(base + "/api/cluster")
                model = view["models"][0]
                if model["state"] in ("ready", "failed"):  # "unplaced" is also the state before the first plan
                    break
            except OSError:
                pass
            time.sleep(0.5)
        results["cluster_view"] = view
        print(json.dumps(view, indent=1)[:4000])
        if not model or model["state"] != "ready":
            results["error"] = f"model not ready: {model}"
            return 1
        rep = model["replicas"][0]
        time.sleep(3)  # let the node refresh its NVML reading
        view = get(base + "/api/cluster")
        gpu = view["nodes"][0]["gpus"][0]
        nv = nvml_snapshot(rep["pid"])
        results["card"] = nv["name"]
        results["vram"] = {
            "replica_accounted_mib": rep["vram_mib"], "nvml_worker_process_mib": nv["process_mib"],
            "replica_vs_nvml_process": rep["vram_mib"] / nv["process_mib"] if nv["process_mib"] else None,
            "api_gpu_used_mib": gpu["vram_used_mib"], "nvml_gpu_used_mib": nv["used_mib"],
            "api_vs_nvml_gpu_used": gpu["vram_used_mib"] / nv["used_mib"],
            "api_gpu_total_mib": gpu["vram_total_mib"], "nvml_total_mib": nv["total_mib"],
            "load_info": rep,
        }
        body = {"model": "gen", "prompt": PROMPT, "max_tokens": GEN_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        stream_timing(base + "/v1/completions", body)  # warm-up
        api_runs = [stream_timing(base + "/v1/completions", body) for _ in range(3)]
        results["concurrency"] = [concurrent_tps(base + "/v1/completions", body, n) for n in (1, PARALLEL)]
        results["cluster_view_after"] = get(base + "/api/cluster")
    finally:
        node.terminate()
        node.wait(60)
    direct_runs = direct_timing(str(model_path))
    api_tps = statistics.median(r[1] for r in api_runs)
    direct_tps = statistics.median(r[1] for r in direct_runs)
    api_ttft = statistics.median(r[0] for r in api_runs)
    direct_ttft = statistics.median(r[0] for r in direct_runs)
    results["speed"] = {"api_runs": api_runs, "direct_runs": direct_runs, "api_decode_tps": api_tps,
                        "direct_decode_tps": direct_tps, "ratio": api_tps / direct_tps,
                        "api_ttft_ms": api_ttft * 1e3, "direct_ttft_ms": direct_ttft * 1e3,
                        "ttft_overhead_ms": (api_ttft - direct_ttft) * 1e3}
    print("\n| measure | through node API | direct llama-cpp-python | ratio |")
    print("|---|---|---|---|")
    print(f"| decode tok/s | {api_tps:.1f} | {direct_tps:.1f} | {api_tps / direct_tps:.3f} |")
    print(f"| TTFT ms | {api_ttft * 1e3:.1f} | {direct_ttft * 1e3:.1f} | +{(api_ttft - direct_ttft) * 1e3:.1f} ms |")
    v = results["vram"]
    print(f"| replica VRAM accounted vs NVML worker process | {v['replica_accounted_mib']:.0f} MiB | "
          f"{v['nvml_worker_process_mib']} MiB | {v['replica_vs_nvml_process']} |")
    print(f"| GPU used /api/cluster vs NVML | {v['api_gpu_used_mib']:.0f} | {v['nvml_gpu_used_mib']:.0f} | "
          f"{v['api_vs_nvml_gpu_used']:.3f} |")
    for c in results["concurrency"]:
        print(f"| {c['streams']} concurrent streams through the node | {c['aggregate_tps']:.1f} tok/s aggregate | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

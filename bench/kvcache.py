"""KV cache types benchmark: how many more models fit with `kv_cache_type = "auto"`, and what q8_0/q4_0 cost.

Run: ``python3 bench/kvcache.py`` (about 1-2 minutes on 2 cores; ``--no-engine`` skips part b). Prints two
tables and writes bench/results/kvcache.json.

(a) Placement, on bench/placement.py's legacy-GPU catalog (real GPUs and GGUF files, bench/catalog.py):
    every model allowed f16 only, against every model allowed f16/q8_0/q4_0 (`placement.kvchoice.place_kv`).
    Per replica need = file + KV cache at the scenario's context * (bytes per element / 2) + compute buffer
    (the compute buffer is kept at its f16 figure, although flash attention makes it smaller: conservative).
    Metrics: models resident (models with >= 1 replica), demand served (fraction of requests/s whose model
    has a replica), served_cap (replica throughput, bench/placement.py), replicas, and the replicas' KV types.
    Scenarios: long contexts (32k, gemma-2 at its 8k maximum), where the KV cache dominates, and the files'
    default contexts, where it does not.
(b) Engine, on the demo Gemma 3 270M (llama.cpp on the CPU here; K and V of one type, flash attention on
    for q8_0/q4_0 as the worker runs them, off for f16):
    - decode tokens/s of the worker's own engine (Runner/BatchEngine, 1 slot), the types taking turns;
    - greedy agreement, teacher-forced: each type reads the same text (prompt + f16's greedy continuation) as
      one prompt, and we count the positions (prompt included) where its argmax equals f16's argmax there
      (1.0 = identical greedy choices; comparing prompt pass with prompt pass keeps the numerical noise
      between batched and one-token decoding, about 4% of positions for f16 itself, out of the figure);
    - free-running agreement: the fraction of positions whose greedy token equals f16's at the same index
      when each type generates on its own (a divergence early makes the rest differ);
    - mean log-probability per token of a fixed English text (closer to 0 is better; f16 is the reference).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aivailable.engine import kvcache  # noqa: E402
from aivailable.placement.kvchoice import place_kv  # noqa: E402
from aivailable.placement.model import ModelSpec, PlacementResult, Problem  # noqa: E402
from aivailable.placement.objective import validate_result  # noqa: E402
from aivailable.placement.solver import place  # noqa: E402
from bench import harness  # noqa: E402
from bench.catalog import (  # noqa: E402  # noqa: E402, I001
    ARCHS,
    ASSUMED_BANDWIDTH_GBPS,
    ASSUMED_TOKENS_PER_REQUEST,
    EMBEDDING_RPS,
    GGUF_FILES,
    MIB,
    GgufFile,
    compute_mib,
    kv_cache_mib,
)
from bench.placement import gpus_of, zipf_demand  # noqa: E402

MAX_CTX = {  # trained context (max_position_embeddings of config.json, without RoPE scaling options)
    "llama-3.2-1b": 131072, "llama-3.2-3b": 131072, "llama-3.1-8b": 131072, "llama-3.3-70b": 131072,
    "qwen2.5-0.5b": 32768, "qwen2.5-7b": 32768, "qwen2.5-14b": 32768, "qwen2.5-32b": 32768,
    "mistral-7b": 32768, "mistral-nemo-12b": 131072, "gemma-2-9b": 8192, "gemma-2-27b": 8192,
    "phi-3.5-mini": 131072,
}
TARGET_RESIDENT = 1.3  # the target: models resident with auto vs f16, where KV dominates
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
MAX_TOKENS = 48
TEXT = ("The history of computing is a story of machines that grew smaller and faster while the problems "
        "they solved grew larger. Early computers filled whole rooms and were programmed by rewiring panels; "
        "today a phone in a pocket holds more memory than every computer of 1970 together. Each generation "
        "of hardware made new kinds of software possible, and each generation of software asked for more.")


# -- (a) placement ----------------------------------------------------------------------------------------
def need_mib(f: GgufFile, ctx: int, kv: str) -> int:
    """One replica of file `f` at context `ctx` with K and V stored as `kv`."""
    ratio = kvcache.kv_type(kv).bits_per_element / 16
    return int(round(f.file_gb * 1e9 / MIB + kv_cache_mib(ARCHS[f.arch], ctx) * ratio + compute_mib(f.file_gb)))


def catalog(long_ctx: int | None) -> tuple[list[ModelSpec], dict[str, float]]:
    """The chat models of bench/catalog.py at `long_ctx` (None: their default context), each allowed every KV
    type, with replica throughput; the embedding model stays at its own context and f16."""
    models, rps = [], {}
    for f in GGUF_FILES:
        ctx = _ctx(f, long_ctx)
        name = f"{f.name}-{f.quant.lower()}"
        kv = {t: need_mib(f, ctx, t) for t in (("f16",) if f.embedding else kvcache.PREFERENCE)}
        models.append(ModelSpec(name=name, vram_mib=kv["f16"], kv_vram_mib=kv, pinned=f.embedding,
                                max_replicas=2 if kv["f16"] > 24 * 1024 else 4))
        rps[name] = EMBEDDING_RPS if f.embedding else ASSUMED_BANDWIDTH_GBPS / f.file_gb / ASSUMED_TOKENS_PER_REQUEST
    return models, rps


def _ctx(f: GgufFile, long_ctx: int | None) -> int:
    return f.default_ctx if long_ctx is None or f.embedding else min(long_ctx, MAX_CTX[f.arch])


LAB = [  # bench/placement.py's lab: 6 nodes, 15 GPUs of 5 generations, NVIDIA and AMD
    ("ws1", ["GTX 1080 Ti", "GTX 1080 Ti"]), ("ws2", ["Tesla P40", "GTX 1080"]),
    ("dgx", ["Tesla V100 32GB", "Tesla V100 32GB"]), ("rig", ["RX 580", "RX 580", "RX 580", "RX 580"]),
    ("amd", ["Radeon VII", "Instinct MI50 32GB"]), ("t4", ["Tesla T4", "Tesla T4", "RTX 2080 Ti"]),
]
SMALL_CARDS = [  # bench/placement.py's overloaded cluster: 6 nodes x 4 cards of 8-11 GiB
    (f"s{i}", [t] * 4) for i, t in enumerate(["GTX 1080", "RX 580", "Tesla P4", "GTX 1070", "GTX 1080 Ti", "RTX 2080 Ti"])
]
SCENARIOS = [  # (name, nodes, context: None = each file's default; capped at each model's trained context)
    ("lab-64k", LAB, 65536),
    ("smallcards-64k", SMALL_CARDS, 65536),
    ("lab-32k", LAB, 32768),
    ("smallcards-32k", SMALL_CARDS, 32768),
    ("smallcards-16k", SMALL_CARDS, 16384),
    ("lab-default", LAB, None),
    ("smallcards-default", SMALL_CARDS, None),
]


def measure(problem: Problem, result: PlacementResult, rps: dict[str, float]) -> dict:
    errors = validate_result(problem, result)
    assert not errors, errors[:3]
    total = sum(problem.demand.values())
    reps = {m.name: result.replicas(m.name) for m in problem.models}
    kv_mix: dict[str, int] = {}
    for rs in reps.values():
        for r in rs:
            kv_mix[r.kv_cache_type or "f16"] = kv_mix.get(r.kv_cache_type or "f16", 0) + 1
    models = {m.name: m for m in problem.models}
    used = sum(models[n].need_mib(r.kv_cache_type) for n, rs in reps.items() for r in rs)
    return {
        "resident": sum(1 for rs in reps.values() if rs),
        "served": sum(problem.demand[n] for n, rs in reps.items() if rs) / total,
        "served_cap": sum(min(problem.demand[n], len(rs) * rps[n]) for n, rs in reps.items()) / total,
        "replicas": sum(len(rs) for rs in reps.values()),
        "kv_types": dict(sorted(kv_mix.items())),
        "vram_used_pct": 100 * used / sum(g.usable_mib for g in problem.gpus),
        "unplaced": len(result.unplaced),
    }


def run_placement() -> list[dict]:
    rows = []
    for name, nodes, ctx in SCENARIOS:
        models, rps = catalog(ctx)
        demand = zipf_demand([m.name for m in models], 1.1, 10.0, random.Random(1))
        gpus = gpus_of(nodes)
        auto = Problem(gpus=gpus, models=models, demand=demand, split_overhead_mib=256)
        f16 = auto.model_copy(update={"models": [m.model_copy(update={"kv_vram_mib": None}) for m in models]})
        t0 = time.perf_counter()
        r_auto = place_kv(auto)
        auto_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        r_f16 = place(f16)
        f16_ms = (time.perf_counter() - t0) * 1000
        a, b = measure(auto, r_auto, rps), measure(f16, r_f16, rps)
        a["solve_ms"], b["solve_ms"] = round(auto_ms, 1), round(f16_ms, 1)
        kv_share = sum(kv_cache_mib(ARCHS[f.arch], _ctx(f, ctx)) for f in GGUF_FILES if not f.embedding) / sum(
            m.vram_mib for m in models if not m.pinned)
        rows.append({"scenario": name, "gpus": len(gpus), "models": len(models), "ctx": ctx or "default",
                     "kv_share_f16": round(kv_share, 3), "f16": b, "auto": a,
                     "resident_ratio": round(a["resident"] / max(1, b["resident"]), 3),
                     "served_ratio": round(a["served"] / max(1e-9, b["served"]), 3)})
    return rows


def placement_table(rows: list[dict]) -> str:
    head = (f"{'scenario':<20}{'KV share':>9}{'policy':>7}{'resident':>9}{'served%':>9}{'cap%':>7}{'reps':>6}"
            f"{'VRAM%':>7}  KV types")
    lines = [head, "-" * (len(head) + 24)]
    for r in rows:
        for pol in ("f16", "auto"):
            m = r[pol]
            mix = " ".join(f"{k}:{v}" for k, v in m["kv_types"].items())
            lines.append(f"{r['scenario']:<20}{100 * r['kv_share_f16']:>8.0f}%{pol:>7}{m['resident']:>9}"
                         f"{100 * m['served']:>9.1f}{100 * m['served_cap']:>7.1f}{m['replicas']:>6}"
                         f"{m['vram_used_pct']:>7.1f}  {mix}")
        lines.append(f"{'':<20}{'':>9}{'auto/f16':>7} resident {r['resident_ratio']:.2f}x, served "
                     f"{r['served_ratio']:.2f}x")
    return "\n".join(lines)


# -- (b) engine -------------------------------------------------------------------------------------------
NO_EOG = {1: -100.0, 106: -100.0}  # Gemma's <eos> and <end_of_turn>: every run generates MAX_TOKENS


def _generate(runner, tokens: list[int], **kw):
    """One request through the worker's engine: (GenResult, per-token logprob entries, emit times)."""
    import threading

    from aivailable.engine.runner import GenParams

    entries: list[dict] = []
    times: list[float] = []

    def emit(_text, lps=None):
        times.append(time.perf_counter())
        entries.extend(lps or ())

    fut = runner.submit(tokens, GenParams(temperature=0, **kw), threading.Event(), emit)
    return fut.result(), entries, times


def run_engine(threads: int, rounds: int = 3) -> dict:
    """Part (b), all through the worker's own engine (Runner, BatchEngine, 1 slot), one Runner per type."""
    import statistics

    from aivailable.engine.runner import Runner
    from aivailable.engine.spec import WorkerSpec

    path = str(harness.demo_model())
    runners = {}
    for kv in kvcache.PREFERENCE:
        runners[kv] = Runner(WorkerSpec(model="gemma", path=path, n_ctx=1024, parallel=1, n_threads=threads,
                                        socket="/tmp/unused.sock", kv_cache_type=kv))
        runners[kv].load()
    tok = runners["f16"].llm.tokenize
    prompts = [tok(p.encode(), add_bos=True) for p in PROMPTS]
    speed: dict[str, list[float]] = {kv: [] for kv in runners}
    free: dict[str, list[list[bytes]]] = {}
    forced: dict[str, list[list[bytes]]] = {}
    logprob: dict[str, float] = {}
    try:
        for rnd in range(rounds):  # decode speed: the types take turns, the first round is a warm-up
            for kv, runner in runners.items():
                for p in prompts:
                    res, _, times = _generate(runner, p, max_tokens=MAX_TOKENS, logit_bias=dict(NO_EOG))
                    if rnd and len(times) > 1:
                        speed[kv].append((res.completion_tokens - 1) / (times[-1] - times[0]))
        for kv, runner in runners.items():  # free-running greedy tokens
            free[kv] = [[bytes(e["bytes"]) for e in _generate(runner, p, max_tokens=MAX_TOKENS, logprobs=0,
                                                               logit_bias=dict(NO_EOG))[1]] for p in prompts]
        # teacher-forced: every type reads the same text (prompt + f16's continuation); its argmax per position
        contexts = [p + tok(b"".join(f), add_bos=False) for p, f in zip(prompts, free["f16"], strict=True)]
        text = tok(TEXT.encode(), add_bos=True)
        for kv, runner in runners.items():
            forced[kv] = []
            for c in contexts:
                res, _, _ = _generate(runner, c, max_tokens=1, logprobs=1, prompt_logprobs=True)
                forced[kv].append([bytes(e["top_logprobs"][0]["bytes"]) for e in res.prompt_logprobs[1:]])
            res, _, _ = _generate(runner, text, max_tokens=1, logprobs=0, prompt_logprobs=True)
            logprob[kv] = statistics.fmean(e["logprob"] for e in res.prompt_logprobs[1:])
    finally:
        for runner in runners.values():
            runner.close()

    def agree(a: list[list[bytes]], b: list[list[bytes]]) -> float:
        same = [sum(x == y for x, y in zip(s, t, strict=False)) / max(1, len(t)) for s, t in zip(a, b, strict=True)]
        return round(statistics.fmean(same), 3)

    info = _info(path)
    return {"model": Path(path).name, "prompts": len(PROMPTS), "max_tokens": MAX_TOKENS, "threads": threads,
            "forced_positions": sum(len(c) - 1 for c in contexts), "text_tokens": len(text) - 1,
            "types": {kv: {"decode_tokens_per_s": round(statistics.median(speed[kv]), 2),
                           "greedy_agreement_forced": agree(forced[kv], forced["f16"]),
                           "greedy_agreement_free": agree(free[kv], free["f16"]),
                           "mean_logprob": round(logprob[kv], 4),
                           "kv_mib_at_32k": round(kvcache.estimate_for(info, kv, n_ctx=32768).kv_cache_mib, 1)}
                      for kv in runners}}


def _info(path: str):
    from aivailable.engine.gguf_info import read_model_info

    return read_model_info(path)


def engine_table(res: dict) -> str:
    head = f"{'KV type':<8}{'decode tok/s':>13}{'greedy (forced)':>16}{'greedy (free)':>14}{'mean logprob':>13}{'KV MiB @32k':>12}"
    lines = [head, "-" * len(head)]
    for kv, r in res["types"].items():
        lines.append(f"{kv:<8}{r['decode_tokens_per_s']:>13.1f}{r['greedy_agreement_forced']:>16.3f}"
                     f"{r['greedy_agreement_free']:>14.3f}{r['mean_logprob']:>13.4f}{r['kv_mib_at_32k']:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-engine", action="store_true", help="skip part (b), the llama.cpp runs")
    ap.add_argument("--threads", type=int, default=2)
    harness.add_output_args(ap, "kvcache")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run_placement()
    print(placement_table(rows))
    best = max((r for r in rows if r["ctx"] != "default"), key=lambda r: r["resident_ratio"])
    checks = [f"{'PASS' if best['resident_ratio'] >= TARGET_RESIDENT else 'MISS'} models resident auto vs f16 where "
              f"KV dominates: {best['resident_ratio']:.2f}x on {best['scenario']} (target >= {TARGET_RESIDENT}x)"]
    for r in rows:
        ok = r["auto"]["served"] >= r["f16"]["served"] - 1e-12 and r["auto"]["resident"] >= r["f16"]["resident"]
        checks.append(f"{'PASS' if ok else 'MISS'} auto never serves less than f16 on {r['scenario']}: "
                      f"{100 * r['auto']['served']:.1f}% vs {100 * r['f16']['served']:.1f}%")
    engine = None
    if not args.no_engine:
        print("\nrunning the demo Gemma with each KV type ...", file=sys.stderr)
        engine = run_engine(args.threads)
        print()
        print(engine_table(engine))
    print()
    print("\n".join(checks))
    elapsed = time.perf_counter() - t0
    print(f"\nbenchmark took {elapsed:.0f} s")
    harness.write_results("kvcache", {"placement": rows, "engine": engine, "targets": checks,
                                      "elapsed_s": round(elapsed, 1), "python": sys.version.split()[0]}, args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

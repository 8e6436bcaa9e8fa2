"""Prefix-aware routing vs the power of two choices, on real nodes and the real model, side by side.

For each replica count (``--replicas``, default 2 and 3) and each routing (``p2c``, ``prefix``) the bench starts a
fresh cluster of that many real ``aivailable up`` nodes on 127.0.0.x (one simulated GPU each, one replica of the
Gemma 3 270M model per node, ``--parallel`` slots), waits until every replica is ready, and runs the workloads (``--workloads``),
every request entering through a node picked at random (seeded), as clients of a cluster do:

- **multi-turn**: ``--conversations`` closed-loop conversations at once, ``--turns`` turns each, behind one
  shared system prompt of about ``--system-tokens`` tokens; each turn appends the previous answer and a new user
  message of about ``--turn-tokens`` tokens of its own, so turn k+1 repeats turn k's whole prompt;
- **distinct**: the same conversations, but each behind a head of its own (an agent's own tool list or
  document, about ``--system-tokens`` tokens): only a replica that served the conversation before holds it,
  so this is where routing decides the cache hit rate; in **multi-turn** every slot already holds the shared
  system prompt, whichever replica it is on;
- **unique** (no shared prefix): the same number of single requests of the same size, every prompt different from its
  first token, so no routing can reuse anything.

Per run: TTFT p50/p90 (request sent -> first streamed content chunk), end-to-end latency p50/p90, aggregate
completion tokens/s, the fraction of prompt tokens served from a slot's cache (``usage.prompt_tokens_details``
of each streamed answer), failures. Then prefix/p2c ratios per replica count. Greedy decoding, the same
``--max-tokens`` for every request; the engine reuses cached prompts in whole 256-token chunks.

    python bench/prefix_routing.py [--replicas 2,3] [--conversations 12] [--turns 4] [--system-tokens 1000]
                                   [--turn-tokens 120] [--max-tokens 12] [--parallel 4] [--seed 1]

All nodes share this machine's CPU, so absolute figures are the CPU's; the ratios are what carries over.
Writes bench/results/prefix_routing.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from bench import harness  # noqa: E402
from bench.harness import NodeProc, start_cluster  # noqa: E402

MODEL = "gemma-3-270m"
SECRET = "prefix-routing-bench-secret-0123456789"
WORDS = ["river", "mountain", "lantern", "copper", "harbor", "violet", "meadow", "engine", "saddle", "orbit", "canyon", "velvet", "pepper", "quartz", "falcon", "ember", "willow", "marble", "thunder", "glacier", "pebble", "compass", "tundra", "ferry"]


def text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of varied words (Gemma's tokenizer: ~1.3 tokens per word here)."""
    return " ".join(rng.choice(WORDS) for _ in range(int(tokens / 1.3))) + "."


class Cluster:
    """`n` real nodes, one replica of the model on each, with the given routing."""

    def __init__(self, tmp: Path, model_path: Path, n: int, routing: str, parallel: int, ctx: int):
        self.tmp, self.n = tmp, n
        cfg = tmp / "models.toml"
        cfg.write_text(f'[node]\nrouting = "{routing}"\n\n[[models]]\nname = "{MODEL}"\npath = "{model_path}"\n'
                       f"ctx = {ctx}\nparallel = {parallel}\nmin_replicas = {n}\nmax_replicas = {n}\n")
        self.cfg = cfg
        self.nodes: list[NodeProc] = []

    def start(self) -> None:
        self.nodes = start_cluster(self.tmp, self.cfg, SECRET, count=self.n, extra=("--log-level", "WARNING"),
                                   timeout=300)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(timeout=20)


def one_request(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> dict:
    """A streamed greedy chat completion: TTFT, latency, answer, token counts."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - t0
    details = usage.prompt_tokens_details if usage else None
    return {"ttft_s": ttft if ttft is not None else total, "latency_s": total, "answer": "".join(parts),
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details else 0,
            "completion_tokens": usage.completion_tokens if usage else 0}


def run_workload(c: Cluster, kind: str, args: argparse.Namespace) -> dict:
    """Run `kind` (multiturn | distinct | unique) against the cluster; per-request records and a summary."""
    rng = random.Random(args.seed)
    system = text(random.Random(args.seed * 7919), args.system_tokens)
    records: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, timeout=300) for n in c.nodes]

    def conversation(ci: int) -> None:
        crng = random.Random(rng.random() + ci)
        if kind in ("multiturn", "distinct"):
            head = system if kind == "multiturn" else f"Conversation {ci}. " + text(crng, args.system_tokens)
            messages = [{"role": "system", "content": head}]
            for turn in range(args.turns):
                messages.append({"role": "user", "content": f"Turn {turn}: " + text(crng, args.turn_tokens)})
                try:
                    rec = one_request(crng.choice(clients), messages, args.max_tokens)
                except Exception as exc:  # noqa: BLE001 - a failure is a result here
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                messages.append({"role": "assistant", "content": rec.pop("answer") or "ok"})
                with lock:
                    records.append({**rec, "turn": turn})
        else:
            for turn in range(args.turns):
                size = args.system_tokens + args.turn_tokens * (turn + 1)
                messages = [{"role": "system", "content": f"Request {ci}-{turn}. " + text(crng, size)},
                            {"role": "user", "content": text(crng, 20)}]
                try:
                    rec = one_request(crng.choice(clients), messages, args.max_tokens)
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                rec.pop("answer")
                with lock:
                    records.append({**rec, "turn": turn})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(args.conversations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarize(records, errors, wall)


def pct(xs: list[float], q: float) -> float | None:
    """q as a fraction (0.5: the median), the value at the rounded rank."""
    return harness.pct(xs, 100 * q, method="nearest")


def summarize(records: list[dict], errors: list[str], wall: float) -> dict:
    ttft = [r["ttft_s"] for r in records]
    lat = [r["latency_s"] for r in records]
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    later = [r["ttft_s"] for r in records if r["turn"] > 0]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"requests": len(records), "failed": len(errors), "errors": errors[:5], "wall_s": round(wall, 2),
            "ttft_ms_p50": ms(pct(ttft, 0.5)), "ttft_ms_p90": ms(pct(ttft, 0.9)),
            "later_turns_ttft_ms_p50": ms(pct(later, 0.5)),
            "latency_ms_p50": ms(pct(lat, 0.5)), "latency_ms_p90": ms(pct(lat, 0.9)),
            "completion_tps": round(sum(r["completion_tokens"] for r in records) / wall, 2) if wall else None,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cache_hit_rate": round(cached / prompt, 3) if prompt else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="2,3")
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--turn-tokens", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--workloads", default="multiturn,distinct,unique")
    ap.add_argument("--seed", type=int, default=1)
    harness.add_output_args(ap, "prefix_routing")
    args = ap.parse_args(argv)
    tmp_root = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    model_path = harness.demo_model()
    per_slot = args.system_tokens + args.turns * (args.turn_tokens + args.max_tokens + 40) + 256
    ctx = args.parallel * (per_slot // 256 + 1) * 256
    runs: dict[str, dict] = {}
    for n in [int(x) for x in args.replicas.split(",")]:
        for routing in ("p2c", "prefix"):
            c = Cluster(Path(tempfile.mkdtemp(prefix=f"r{n}-{routing}-", dir=tmp_root)), model_path, n, routing,
                        args.parallel, ctx)
            try:
                c.start()
                for kind in args.workloads.split(","):
                    key = f"{n}/{routing}/{kind}"
                    runs[key] = run_workload(c, kind, args)
                    print(key, json.dumps(runs[key]), flush=True)
            finally:
                c.stop()
    comparisons = {}
    for key, r in runs.items():
        n, routing, kind = key.split("/")
        base = runs.get(f"{n}/p2c/{kind}")
        if routing != "prefix" or base is None:
            continue
        comparisons[f"{n}/{kind}"] = {
            "ttft_p50_speedup": ratio(base["ttft_ms_p50"], r["ttft_ms_p50"]),
            "ttft_p90_speedup": ratio(base["ttft_ms_p90"], r["ttft_ms_p90"]),
            "latency_p50_speedup": ratio(base["latency_ms_p50"], r["latency_ms_p50"]),
            "tps_ratio": ratio(r["completion_tps"], base["completion_tps"])}
    rows = ["| replicas | workload | routing | requests (failed) | TTFT p50 / p90 ms | later turns TTFT p50 ms | "
            "latency p50 / p90 ms | tokens/s | cache hit rate |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        n, routing, kind = key.split("/")
        rows.append(f"| {n} | {kind} | {routing} | {r['requests']} ({r['failed']}) | {r['ttft_ms_p50']} / "
                    f"{r['ttft_ms_p90']} | {r['later_turns_ttft_ms_p50']} | {r['latency_ms_p50']} / "
                    f"{r['latency_ms_p90']} | {r['completion_tps']} | {r['cache_hit_rate']} |")
    rows += ["", "| replicas/workload | TTFT p50 speed-up | TTFT p90 speed-up | latency p50 speed-up | tokens/s ratio |",
             "|---|---|---|---|---|"]
    for key, q in comparisons.items():
        rows.append(f"| {key} | {q['ttft_p50_speedup']} | {q['ttft_p90_speedup']} | {q['latency_p50_speedup']} | "
                    f"{q['tps_ratio']} |")
    print("\n".join(rows))
    out = {"bench": "prefix_routing", "ctx": ctx, "machine": platform.machine(), "cpus": os.cpu_count(),
           "runs": runs, "prefix_vs_p2c": comparisons}
    print(f"wrote {harness.write_results('prefix_routing', out, args=args, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of constrained decoding: a JSON-schema grammar vs free text, and a forced tool call vs free text.

Loads the real Gemma 3 270M in this process through the worker's own Runner (the batch engine a worker
runs, `parallel` slots) and, taking turns with the same prompts, measures:
- decode tokens/s with `response_format: json_schema` vs without, at 1 and at 4 concurrent streams (the
  grammar is sampled per sequence on the engine thread: it must not serialise the batch);
- time to a complete forced tool call (`tool_choice` named, one call) vs the same number of free tokens.
Generation ends at the grammar's end or at max_tokens; end-of-generation is not allowed in the free runs
(logit_bias), so both sides produce comparable token counts. Ratios come from one run, side by side.

    python bench/constrained.py [--reps 3] [--max-tokens 96] [--out bench/results/constrained.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aivailable.engine.chatplan import plan_chat  # noqa: E402
from aivailable.engine.manager import default_threads  # noqa: E402
from aivailable.engine.runner import GenParams, Runner  # noqa: E402
from aivailable.engine.spec import WorkerSpec  # noqa: E402
from aivailable.wire.schemas import parse_request  # noqa: E402
from bench import harness  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "summary", "facts"],
          "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                         "facts": {"type": "array", "items": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the library catalog",
                                           "parameters": {"type": "object", "required": ["query", "limit"],
                                                          "properties": {"query": {"type": "string"},
                                                                         "limit": {"enum": [5, 10, 20]}}}}}]
TOPICS = ["the printing press", "the bicycle", "the telephone", "the steam engine"]
NO_EOG = {1: -100.0, 106: -100.0}  # Gemma's <eos> and <end_of_turn>: free runs go to max_tokens


def _run(runner: Runner, bodies: list[dict], free: bool, max_tokens: int) -> list[dict]:
    """Run the requests concurrently; per request: tokens, seconds to first and last token."""
    futs, marks = [], []
    for body in bodies:
        req = parse_request("chat", body)
        plan = plan_chat(req, runner.tool_format)
        tokens, stops, _ = runner.chat_prompt(plan)
        p = GenParams(max_tokens=max_tokens, temperature=0, stop=stops,
                      grammar=None if free else plan.grammar, logit_bias=dict(NO_EOG) if free else {})
        mark = {"t0": time.perf_counter(), "first": None, "last": None}

        def emit(_text, _lp=None, mark=mark):
            now = time.perf_counter()
            mark["first"] = mark["first"] or now
            mark["last"] = now

        marks.append(mark)
        futs.append(runner.submit(tokens, p, threading.Event(), emit))
    wait(futs)
    out = []
    for f, m in zip(futs, marks, strict=True):
        r = f.result()
        decode = (m["last"] - m["first"]) if m["first"] and m["last"] else 0.0
        out.append({"tokens": r.completion_tokens, "total_s": m["last"] - m["t0"] if m["last"] else None,
                    "tps": (r.completion_tokens - 1) / decode if decode > 0 else None})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    harness.add_output_args(ap, "constrained")
    args = ap.parse_args(argv)
    path = harness.demo_model()
    runner = Runner(WorkerSpec(model="gemma", path=str(path), n_ctx=4 * 1024, parallel=4,
                               n_threads=default_threads(), socket="/tmp/unused.sock"))
    runner.load()
    rows: dict[str, list] = {}
    try:
        for rep in range(args.reps + 1):  # the first round warms up and is dropped
            for streams in (1, 4):
                bodies = [{"model": "gemma", "messages": [{"role": "user", "content": f"Describe {t} as JSON."}],
                           "response_format": {"type": "json_schema", "json_schema": {"name": "doc",
                                                                                      "schema": SCHEMA}}}
                          for t in TOPICS[:streams]]
                order = [True, False] if rep % 2 else [False, True]
                for free in order:
                    got = _run(runner, bodies, free, args.max_tokens)
                    if rep:
                        key = f"{'free' if free else 'json_schema'}_{streams}"
                        rows.setdefault(key, []).append(sum(g["tps"] or 0 for g in got))
            tool = [{"model": "gemma", "messages": [{"role": "user", "content": "Find books about bicycles."}],
                     "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}},
                     "parallel_tool_calls": False}]
            call = _run(runner, tool, False, args.max_tokens)[0]
            free = _run(runner, tool, True, call["tokens"])[0]
            if rep:
                rows.setdefault("tool_call_s", []).append(call["total_s"])
                rows.setdefault("tool_free_s", []).append(free["total_s"])
                rows.setdefault("tool_tokens", []).append(call["tokens"])
    finally:
        runner.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {"json_schema_vs_free_1": med["json_schema_1"] / med["free_1"],
              "json_schema_vs_free_4": med["json_schema_4"] / med["free_4"],
              "tool_call_vs_free": med["tool_call_s"] / med["tool_free_s"]}
    print("| measure | value |\n| --- | --- |")
    for k in ("free_1", "json_schema_1", "free_4", "json_schema_4"):
        print(f"| decode tokens/s, {k.replace('_', ', ')} stream(s) (sum over streams) | {med[k]:.1f} |")
    print(f"| forced tool call: {med['tool_tokens']:.0f} tokens | {med['tool_call_s']:.2f} s |")
    print(f"| same number of free tokens | {med['tool_free_s']:.2f} s |")
    for k, v in ratios.items():
        print(f"| ratio {k} | {v:.2f} |")
    result = {"bench": "constrained", "machine": platform.platform(), "reps": args.reps,
              "max_tokens": args.max_tokens, "samples": rows, "medians": med, "ratios": ratios,
              "target_json_schema_ge_0_9": min(ratios["json_schema_vs_free_1"], ratios["json_schema_vs_free_4"]) >= 0.9}
    print(f"wrote {harness.write_results('constrained', result, args=args, indent=2)}")


if __name__ == "__main__":
    main()

"""Continuous batching in the llama.cpp worker: a real node serving Gemma 3 270M with `parallel = 4`.

The tests drive the node through the official OpenAI client, several requests at once; the last one
checks the engine's prompt-prefix reuse in process.

About exact equality of greedy outputs: the engine makes everything it controls independent of other
requests (a slot's own KV stream, prompts fed alone in fixed chunks, per-request samplers, reused
prefixes only in whole chunks). What it cannot control is llama.cpp's matrix kernels: this CPU build
computes a batch of 4 or more rows with a different (repacked Q4_K "gemm") kernel than 1 to 3 rows
("gemv"), which can flip a near-tie at temperature 0. So the equality tests keep at most 3
sequences generating at once, where the kernels are the same as for a request alone.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"
PARALLEL = 4


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("batching")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 2048\nparallel = {PARALLEL}\n'
                   'max_queue = 16\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g:4096", models=(MODEL,)) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.api, api_key="unused", max_retries=0, timeout=120)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def stream_chat(client, **kw) -> dict:
    """One streamed request (chat, or a text completion when `prompt` is given): its text, finish
    reason, usage, and when it was sent, began (response headers: it got a slot) and ended."""
    t0 = time.perf_counter()
    api = client.completions if "prompt" in kw else client.chat.completions
    stream = api.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw)
    started = time.perf_counter()
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            parts.append((c.text if "prompt" in kw else c.delta.content) or "")
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": "".join(parts), "finish": finish, "usage": usage, "t0": t0, "started": started,
            "ended": time.perf_counter()}


def run_together(calls: list) -> list[dict]:
    """Run each zero-argument call on its own thread, all at once; re-raise the first failure."""
    results: list[dict] = [{} for _ in calls]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads)
    return results


def worker_health(node) -> dict:
    return node.cluster()["models"][0]["replicas"][0]


def test_worker_reports_its_slots(node):
    rep = worker_health(node)
    assert rep["slots"] == PARALLEL and rep["state"] == "ready"


def test_concurrent_streams_with_different_parameters(client):
    requests = [
        dict(messages=chat("Give a JSON object with a key 'sea'."), max_tokens=24, temperature=0,
             response_format={"type": "json_object"}),
        dict(messages=chat("List some fruits."), max_tokens=9, temperature=1.0, top_p=0.9, seed=7),
        dict(messages=chat("Count from one to twenty in words."), max_tokens=40, temperature=0, stop=[","]),
        dict(messages=chat("Write a poem about stars."), max_tokens=30, temperature=0.7, seed=3,
             extra_body={"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1}),
    ]
    got = run_together([lambda kw=kw: stream_chat(client, **kw) for kw in requests])
    for kw, r in zip(requests, got, strict=True):
        u = r["usage"]
        assert u is not None and r["finish"] in ("stop", "length"), r
        assert 8 <= u.prompt_tokens <= 40
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert 1 <= u.completion_tokens <= kw["max_tokens"]
        if r["finish"] == "length":
            assert u.completion_tokens == kw["max_tokens"]
        for s in kw.get("stop", []):
            assert s not in r["text"]
    assert got[0]["text"].lstrip().startswith("{")  # the JSON grammar held under batching
    # The prompt is counted as for the same request alone.
    alone = stream_chat(client, **requests[2])
    assert alone["usage"].prompt_tokens == got[2]["usage"].prompt_tokens


GREEDY = [
    dict(messages=chat("Explain how a bicycle works."), max_tokens=40, temperature=0),
    dict(messages=chat("Name three colors."), max_tokens=25, temperature=0, stop=["."]),
]
SEEDED = dict(messages=chat("Invent a name for a cat."), max_tokens=30, temperature=1.0, seed=1234)


def test_outputs_under_concurrency_equal_outputs_alone(client):
    cases = [*GREEDY, SEEDED]
    alone = [stream_chat(client, **kw) for kw in cases]
    together = run_together([lambda kw=kw: stream_chat(client, **kw) for kw in cases])
    for a, t in zip(alone, together, strict=True):
        assert t["text"] == a["text"]
        assert t["finish"] == a["finish"] and t["usage"] == a["usage"]
    # They really ran at the same time: each began before any other ended.
    assert max(t["started"] for t in together) < min(t["ended"] for t in together)


def test_cancelling_one_stream_leaves_the_others_intact(node, client):
    alone = [stream_chat(client, **kw) for kw in GREEDY]
    before = worker_health(node)["cancelled"]
    reading = threading.Event()

    def cancelled_stream() -> dict:
        stream = client.chat.completions.create(model=MODEL, messages=chat("Tell me a very long story."),
                                                max_tokens=1000, temperature=1.0, stream=True)
        n = 0
        for _ in stream:
            n += 1
            if n == 5:
                reading.set()
            if n == 8:
                break
        stream.close()  # the client goes away mid-stream
        return {"chunks": n}

    def later(kw):
        reading.wait(60)
        return stream_chat(client, **kw)

    got = run_together([cancelled_stream, *(lambda kw=kw: later(kw) for kw in GREEDY)])
    assert got[0]["chunks"] == 8
    for a, t in zip(alone, got[1:], strict=True):
        assert t["text"] == a["text"] and t["usage"] == a["usage"] and t["finish"] == a["finish"]
    deadline = time.monotonic() + 20
    while worker_health(node)["cancelled"] <= before:
        assert time.monotonic() < deadline, "the closed stream was never cancelled"
        time.sleep(0.1)


def test_more_requests_than_slots_queue_and_start_in_order(client):
    n = 2 * PARALLEL
    # The first PARALLEL free their slots one after another (different lengths); the rest wait.
    max_tokens = [16 + 8 * i for i in range(PARALLEL)] + [24] * PARALLEL

    def call(i: int) -> dict:
        time.sleep(0.1 * i)  # arrival order = i
        return stream_chat(client, prompt=f"{i}, {i + 1}, {i + 2},", max_tokens=max_tokens[i], temperature=0)

    got = run_together([lambda i=i: call(i) for i in range(n)])
    for r, mt in zip(got, max_tokens, strict=True):
        assert r["finish"] in ("stop", "length") and 1 <= r["usage"].completion_tokens <= mt
    starts = [r["started"] for r in got]
    # The queued ones got a slot in arrival order, each only once an earlier request had finished
    # (a slot is free a moment before its client has read the end of the stream).
    slack = 0.3
    assert all(starts[i] < starts[i + 1] + 0.05 for i in range(PARALLEL, n - 1)), starts
    for k in range(PARALLEL, n):
        finished = sum(1 for r in got[:k] if r["ended"] - slack < starts[k])
        assert finished >= k - PARALLEL + 1, (k, starts, [r["ended"] for r in got])


def test_cached_prompt_prefix_is_reused_in_whole_chunks(gemma_path, tmp_path):
    """In process: a prompt sharing a long prefix with a finished one feeds only the chunks after it,
    and its greedy output is the same as when the whole prompt is fed fresh."""
    from aivailable.engine.batch import PROMPT_CHUNK
    from aivailable.engine.runner import GenParams, Runner
    from aivailable.engine.spec import WorkerSpec

    runner = Runner(WorkerSpec(model=MODEL, path=str(gemma_path), n_ctx=2048, parallel=2, n_threads=2,
                               socket=str(tmp_path / "w.sock")))
    runner.load()
    try:
        engine = runner.engine
        assert engine.n_ctx_seq == 1024
        words = " ".join(f"item{i}" for i in range(100))
        a = runner.text_prompt(f"A list: {words}. The end of the first list.")
        b = runner.text_prompt(f"A list: {words}. Now something else entirely.")
        assert PROMPT_CHUNK < len(a) < 2 * PROMPT_CHUNK

        def greedy(tokens: list[int]) -> tuple[str, int]:
            out: list[str] = []
            fed = engine.prompt_tokens_fed
            runner.generate(tokens, GenParams(max_tokens=12, temperature=0), threading.Event(),
                            lambda text, _logprobs: out.append(text))
            return "".join(out), engine.prompt_tokens_fed - fed

        fresh, fed = greedy(a)
        assert fed == len(a) and fresh
        greedy(b)  # now slot 0 caches b, which shares whole chunks with a
        again, fed = greedy(a)
        common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        assert fed == len(a) - common // PROMPT_CHUNK * PROMPT_CHUNK < len(a)
        assert again == fresh
        rerun, fed = greedy(a)  # the same prompt again: all but its last (partial) chunk is reused
        assert fed == len(a) - (len(a) - 1) // PROMPT_CHUNK * PROMPT_CHUNK and rerun == fresh
    finally:
        runner.close()

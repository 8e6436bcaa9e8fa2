"""Worker lifecycle through a real node: loading, crashes (kill -9), queue limits, cancellation, --demo."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import openai
import pytest

from tests.nodeproc import start_node

MODEL = "gemma-3-270m"
MSG = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def replica(node) -> dict:
    return node.cluster()["models"][0]["replicas"][0]


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise TimeoutError(what)


@pytest.fixture()
def node(tmp_path, gemma_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 1024\nmax_queue = 1\n')
    # load_wait_s = 0: these tests are about the answers a client gets at once (503 while loading, 429 when
    # the queue is full); tests/test_load_wait.py has the waiting.
    n = start_node(tmp_path, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--load-wait-s", "0")
    n.wait_healthy()
    yield n
    n.stop()


def test_loading_is_503_with_retry_after_then_serves(node):
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
    seen_503 = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            assert int(e.response.headers["Retry-After"]) >= 1
            assert e.body["code"] == "model_not_ready"
            seen_503.append(e.message)
            time.sleep(0.2)
    else:
        pytest.fail("model never became ready")
    assert r.parse().usage.completion_tokens <= 2
    assert seen_503, "the first request right after start should have met a loading model"
    assert "loading" in seen_503[-1] or "being placed" in seen_503[-1]


def test_worker_kill_9_mid_stream_then_recovers(node):
    node.wait_model(MODEL)
    pid = replica(node)["pid"]
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=400, stream=True)
    got = []
    with pytest.raises(openai.APIError) as err:
        for i, chunk in enumerate(stream):
            got.append(chunk)
            if i == 3:
                os.kill(pid, signal.SIGKILL)
    assert len(got) >= 4
    assert "failed" in str(err.value.message)
    # The supervisor restarts it (new pid) and the next request succeeds.
    wait_for(lambda: replica(node)["state"] == "ready" and replica(node)["pid"] != pid, 60, "worker restart")
    assert replica(node)["restarts"] == 1
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_worker_kill_9_before_first_byte_is_clean_503(node):
    node.wait_model(MODEL)
    pid = replica(node)["pid"]
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
    result = {}

    def call():
        try:
            result["ok"] = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=300)
        except openai.APIStatusError as e:
            result["err"] = e

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: node.cluster()["models"][0]["replicas"][0]["outstanding"] >= 1, 10, "request in flight")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    assert "err" in result, result
    assert result["err"].status_code == 503
    assert int(result["err"].response.headers["Retry-After"]) >= 1
    wait_for(lambda: replica(node)["state"] == "ready" and replica(node)["pid"] != pid, 60, "worker restart")
    assert client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices


def test_queue_full_is_429_with_retry_after(node):
    node.wait_model(MODEL)
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=120)
    statuses: list[int] = []
    retry_after: list[str] = []
    lock = threading.Lock()

    def call():
        try:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40)
            code = 200
        except openai.RateLimitError as e:
            code = 429
            retry_after.append(e.response.headers.get("Retry-After", ""))
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    # One runs, one waits (max_queue = 1), the rest are turned away at once.
    assert statuses.count(200) >= 2
    assert statuses.count(429) >= 1
    assert all(r.isdigit() and int(r) >= 1 for r in retry_after)


def test_client_disconnect_stops_generation(node):
    node.wait_model(MODEL)
    body = {"model": MODEL, "messages": MSG, "max_tokens": 1500, "stream": True, "temperature": 1.0,
            "min_p": 0.0, "top_k": 0}
    conn = http.client.HTTPConnection(node.host, node.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(6):
        assert r.readline().startswith((b"data: ", b"\n"))
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    t0 = time.monotonic()
    wait_for(lambda: replica(node)["cancelled"] >= 1, 20, "generation cancelled")
    # The worker is free again at once: a short request is not stuck behind 1,500 tokens.
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
    client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
    assert time.monotonic() - t0 < 30


def test_demo_flag_assembles_model_and_serves(tmp_path):
    n = start_node(tmp_path, "--demo", name="demo")
    try:
        n.wait_healthy(timeout=180)
        n.wait_model("gemma-3-270m", timeout=180)
        assert (n.state_dir / "models" / "gemma-3-270m-q4_k_m.gguf").is_file()
        gpu = n.cluster()["nodes"][0]["gpus"][0]
        assert gpu["simulated"] is True
        client = openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="gemma-3-270m", messages=MSG, max_tokens=2).choices
    finally:
        assert n.stop() == 0  # SIGTERM: clean shutdown, exit 0


def test_node_exits_when_killed_and_takes_workers_with_it(tmp_path, gemma_path):
    n = start_node(tmp_path, "--model", f"{MODEL}={gemma_path}:512", "--simulate-gpu", "g0:4096")
    n.wait_healthy()
    n.wait_model(MODEL)
    pid = replica(n)["pid"]
    n.kill_group()
    # The worker notices its parent is gone (stdin EOF) and exits on its own.
    wait_for(lambda: not _alive(pid), 15, "orphaned worker exit")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False




def test_worker_refuses_a_real_gpu_model_that_is_not_fully_offloaded(tmp_path, gemma_path):
    """GPU or nothing: on this CPU-only llama.cpp build a non-simulated load offloads nothing and is refused."""
    import subprocess
    import sys

    from aivailable.engine.spec import WorkerSpec

    spec = WorkerSpec(model=MODEL, path=str(gemma_path), n_ctx=512, n_threads=2, device_ids=("nvidia:0",),
                      simulated=False, socket=str(tmp_path / "w.sock"))
    r = subprocess.run([sys.executable, "-m", "aivailable.engine.worker", spec.model_dump_json()],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 3, r.stderr
    event = json.loads(r.stdout.strip().splitlines()[-1])
    assert event["event"] == "failed"
    assert "refusing to run partly on the CPU" in event["reason"]
    assert not (tmp_path / "w.sock").exists()


def test_worker_loads_llama_cpp_before_any_other_cpp_extension():
    """A CUDA build of libllama crashed in every load when another C++ extension (aiohttp's frozenlist)
    had loaded libstdc++ first (H100, bench/README.md); the worker must bring llama.cpp in first."""
    import subprocess
    import sys

    code = ("import sys, aivailable.engine.worker\n"
            "print('\\n'.join(m for m in sys.modules))\n"
            "print('MAPS', *sorted({l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = out.splitlines()
    assert "frozenlist._frozenlist" in mods and "libstdc++" in mods[-1]  # the hazard is still there
    assert mods.index("llama_cpp.llama_cpp") < mods.index("frozenlist._frozenlist")

"""Requests wait for a loading model (bounded), and idle models unload after keep_alive: real node processes,
the real Gemma model, the official openai client (no client retries)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time

import openai
import pytest

from tests.nodeproc import free_port, start_node

MODEL = "gemma-3-270m"
MSG = [{"role": "user", "content": "Say hello."}]


def wait_for(pred, timeout=60.0, what="condition", every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(what)


def metric(node, name: str, model: str = MODEL) -> float:
    text = http.client.HTTPConnection(node.host, node.port, timeout=10)
    text.request("GET", "/metrics")
    body = text.getresponse().read().decode()
    text.close()
    m = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def model_view(node, name: str = MODEL) -> dict:
    return next(m for m in node.cluster()["models"] if m["name"] == name)


def write_config(tmp_path, gemma_path, **extra) -> str:
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 1024\n{lines}')
    return str(cfg)


def client(node, timeout: float = 180.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=timeout)


def test_requests_sent_while_the_model_loads_are_served_streamed_and_not(tmp_path, gemma_path):
    node = start_node(tmp_path, "--config", write_config(tmp_path, gemma_path), "--simulate-gpu", "g0:4096")
    try:
        node.wait_healthy()
        assert model_view(node)["state"] != "ready"  # just started: placing or loading
        results: dict[str, object] = {}

        def plain():
            try:
                results["plain"] = client(node).chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
            except Exception as e:  # reported below
                results["plain"] = e

        def streamed():
            try:
                chunks = list(client(node).chat.completions.create(
                    model=MODEL, messages=MSG, max_tokens=3, stream=True, stream_options={"include_usage": True}))
                results["stream"] = chunks
            except Exception as e:
                results["stream"] = e

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        seen_waiting = wait_for(lambda: metric(node, "aivailable_load_waiting") >= 1 or not any(
            t.is_alive() for t in threads), 60, "requests waiting")
        for t in threads:
            t.join(180)
        assert not isinstance(results["plain"], Exception), results["plain"]
        assert results["plain"].choices[0].finish_reason in ("stop", "length")
        chunks = results["stream"]
        assert not isinstance(chunks, Exception), chunks
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 3
        assert seen_waiting
        assert metric(node, "aivailable_load_wait_seconds_count") == 2  # both waited, neither failed
        assert metric(node, "aivailable_load_waiting") == 0
        assert "waited" in node.log()
    finally:
        node.stop()


def _replica_pid(node) -> int | None:
    reps = model_view(node)["replicas"]
    return reps[0]["pid"] if reps and reps[0].get("pid") and reps[0]["state"] in ("starting", "loading") else None


def _raw_request(node) -> socket.socket:
    """Send a chat request over a raw socket (closed later to play a client that gives up)."""
    body = json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 2}).encode()
    s = socket.create_connection((node.host, node.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_waiting_is_bounded_a_leaving_client_leaves_the_queue_and_load_wait_0_is_503(tmp_path, gemma_path):
    # max_queue = 1, parallel = 1: at most 2 requests wait for the one placed replica.
    node = start_node(tmp_path, "--config", write_config(tmp_path, gemma_path, max_queue=1),
                      "--simulate-gpu", "g0:4096", "--load-wait-s", "6")
    pid = None
    try:
        node.wait_healthy()
        pid = wait_for(lambda: _replica_pid(node), 120, "worker loading", every=0.02)
        os.kill(pid, signal.SIGSTOP)  # the load never finishes until SIGCONT
        assert model_view(node)["state"] == "loading"
        socks = [_raw_request(node), _raw_request(node)]
        wait_for(lambda: metric(node, "aivailable_load_waiting") == 2, 30, "two waiters")
        with pytest.raises(openai.APIStatusError) as full:  # a third is beyond the queue limit
            client(node).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert full.value.status_code == 503 and "2 requests already wait" in full.value.message
        assert int(full.value.response.headers["Retry-After"]) >= 1
        for s in socks:  # the clients give up: their requests leave the queue
            s.close()
        wait_for(lambda: metric(node, "aivailable_load_waiting") == 0, 30, "waiters gone")
        assert metric(node, "aivailable_load_wait_seconds_count") == 2
        with pytest.raises(openai.APIStatusError) as late:  # bounded: after load_wait_s, today's 503
            client(node).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert late.value.status_code == 503 and late.value.body["code"] == "model_not_ready"
        assert "loading" in late.value.message and int(late.value.response.headers["Retry-After"]) >= 1
        assert metric(node, "aivailable_load_wait_seconds_count") == 3
        assert metric(node, "aivailable_load_wait_seconds_sum") >= 6
        os.kill(pid, signal.SIGCONT)
        pid = None
        node.wait_model(MODEL)  # (the load may take longer than this node's 6 s wait on a busy machine)
        r = client(node).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        node.stop()


def test_load_wait_0_answers_503_at_once(tmp_path, gemma_path):
    node = start_node(tmp_path, "--config", write_config(tmp_path, gemma_path), "--simulate-gpu", "g0:4096",
                      "--load-wait-s", "0")
    try:
        node.wait_healthy()
        with pytest.raises(openai.APIStatusError) as e:
            client(node).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "model_not_ready"
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert metric(node, "aivailable_load_wait_seconds_count") == 0
    finally:
        node.stop()


def _idle(node) -> bool:
    m = model_view(node)
    return m["state"] == "unplaced" and m["reason"].startswith("idle") and not m["replicas"]


def test_keep_alive_unloads_idle_models_and_the_next_request_reloads(tmp_path, gemma_path):
    node = start_node(tmp_path, "--config", write_config(tmp_path, gemma_path, keep_alive="3s"),
                      "--simulate-gpu", "g0:4096")
    try:
        node.wait_healthy()
        wait_for(lambda: _idle(node), 120, "unloaded after keep_alive")  # configured at start, never used
        m = model_view(node)
        assert m["keep_alive"] == "3s" and m["unload_in_s"] is None and "loads on the next request" in m["reason"]
        gpu = node.cluster()["nodes"][0]["gpus"][0]
        assert gpu["models"] == [] and gpu["vram_used_mib"] == 0  # its VRAM is free
        c = client(node)
        r = c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)  # waits for the reload
        assert r.usage.completion_tokens <= 2
        assert metric(node, "aivailable_load_wait_seconds_count") == 1
        wait_for(lambda: _idle(node), 60, "unloaded again after keep_alive")
        assert any("idle past keep_alive" in e["text"] for e in node.cluster()["events"])

        # keep_alive in the body, as Ollama: -1 keeps it loaded past the model's 3 s.
        c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, extra_body={"keep_alive": -1})
        m = wait_for(lambda: (v := model_view(node))["state"] == "ready" and v, 30, "ready")
        assert m["keep_alive"] == "forever" and m["unload_in_s"] is None
        time.sleep(6)  # twice the model's keep_alive
        assert model_view(node)["state"] == "ready"
        c.completions.create(model=MODEL, prompt="Once", max_tokens=2, extra_body={"keep_alive": "1m"})
        m = model_view(node)
        assert m["keep_alive"] == "1m" and m["unload_in_s"] is not None and 0 < m["unload_in_s"] <= 60
        c.completions.create(model=MODEL, prompt="Once", max_tokens=2, extra_body={"keep_alive": 0})
        wait_for(lambda: _idle(node), 60, "unloaded after a keep_alive 0 request")
        assert model_view(node)["reason"].startswith("idle: no request for 0s")
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, extra_body={"keep_alive": "soon"})
        assert bad.value.body["param"] == "keep_alive"
        assert "unload in" in http_get(node, "/")
    finally:
        node.stop()


def http_get(node, path: str) -> str:
    conn = http.client.HTTPConnection(node.host, node.port, timeout=10)
    conn.request("GET", path)
    body = conn.getresponse().read().decode()
    conn.close()
    return body


SECRET = "load-wait-test-secret-0123456789abcdef"


def test_a_request_for_a_model_whose_holder_just_died_waits_for_its_re_placement(tmp_path, gemma_path):
    """Two nodes, one replica: kill -9 its holder and ask the survivor at once. The request waits while the
    failure is detected and the model is re-placed and loaded on the survivor, and is served."""
    cfg = write_config(tmp_path, gemma_path, max_replicas=1)
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2)}
    nodes = {}
    try:
        for i in (1, 2):
            args = ["--config", cfg, "--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET, "--node-id", f"n{i}"]
            if i == 2:
                args += ["--join", f"127.0.0.1:{ports[1]}"]
            nodes[i] = start_node(tmp_path, *args, host=f"127.0.0.{i}", port=ports[i], name=f"n{i}")
            nodes[i].wait_healthy()
        def holders():
            both = all({n["id"] for n in v.cluster()["nodes"] if n["state"] == "alive"} == {"n1", "n2"}
                       for v in nodes.values())
            return both and [r["node"] for r in model_view(nodes[1])["replicas"] if r["state"] == "ready"]

        ready = wait_for(holders, 120, "model ready on one of two nodes")
        holder = int(ready[0][1:])
        entry = nodes[3 - holder]
        client(entry).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)  # served by the holder
        before = metric(entry, "aivailable_load_wait_seconds_count")  # (1 if the entry had not heard "ready" yet)
        nodes[holder].kill_group()
        results = {}

        def ask(key, stream):
            try:
                r = client(entry).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, stream=stream)
                results[key] = list(r) if stream else r
            except Exception as e:
                results[key] = e

        threads = [threading.Thread(target=ask, args=(k, k == "stream")) for k in ("plain", "stream")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not isinstance(results["plain"], Exception), (results["plain"], entry.log()[-3000:])
        assert not isinstance(results["stream"], Exception), results["stream"]
        assert results["plain"].choices and results["stream"]
        assert metric(entry, "aivailable_load_wait_seconds_count") == before + 2
        assert [r["node"] for r in model_view(entry)["replicas"] if r["state"] == "ready"] == [entry_id(entry)]
    finally:
        for n in nodes.values():
            n.kill_group()


def entry_id(node) -> str:
    return node.cluster()["node_id"]

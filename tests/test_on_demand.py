"""Demand moves models: a requested model that is not loaded gets loaded (evicting an idle one) when VRAM is short."""

from __future__ import annotations

import time

import openai

from tests.nodeproc import start_node


def _one_loaded(tmp_path, gemma_path, *flags: str):
    """A node whose GPU has room for one of two models: (node, loaded model, unplaced model)."""
    cfg = tmp_path / "models.toml"
    cfg.write_text("".join(f'[[models]]\nname = "{m}"\npath = "{gemma_path}"\nctx = 1024\nmax_replicas = 1\n\n'
                           for m in ("first", "second")))
    node = start_node(tmp_path, "--config", str(cfg), "--simulate-gpu", "small:1200", *flags)  # room for one
    try:
        node.wait_healthy()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {m["name"]: m["state"] for m in node.cluster()["models"]}
            if "ready" in states.values():
                break
            time.sleep(0.2)
        loaded = next(n for n, s in states.items() if s == "ready")
        idle = next(n for n in states if n != loaded)
        assert states[idle] == "unplaced", states
    except BaseException:
        node.stop()
        raise
    return node, loaded, idle


def test_requests_for_an_unloaded_model_get_it_loaded(tmp_path, gemma_path):
    # load_wait_s = 0: the 503 + Retry-After path (test_a_request_waits_while_its_model_is_loaded_on_demand waits).
    node, loaded, idle = _one_loaded(tmp_path, gemma_path, "--load-wait-s", "0")
    try:
        client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
        first_error = None
        served = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                served = client.chat.completions.with_raw_response.create(
                    model=idle, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
                break
            except openai.APIStatusError as e:
                assert e.status_code == 503, e
                first_error = first_error or e
                time.sleep(min(2.0, float(e.response.headers.get("Retry-After", "1"))))
        assert served is not None, node.log()[-3000:]
        assert first_error is not None and int(first_error.response.headers["Retry-After"]) >= 1
        states = {m["name"]: m["state"] for m in node.cluster()["models"]}
        assert states[idle] == "ready" and states[loaded] == "unplaced", states
        assert any(idle in e["text"] for e in node.cluster()["events"])
    finally:
        node.stop()


def test_a_request_waits_while_its_model_is_loaded_on_demand(tmp_path, gemma_path):
    node, loaded, idle = _one_loaded(tmp_path, gemma_path)
    try:
        client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=180)
        r = client.chat.completions.create(model=idle, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.usage.completion_tokens <= 2  # one request, no retries: it waited for the eviction and load
        states = {m["name"]: m["state"] for m in node.cluster()["models"]}
        assert states[idle] == "ready" and states[loaded] == "unplaced", states
    finally:
        node.stop()

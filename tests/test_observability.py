"""Observability on a real node with the real Gemma model: token-level TTFT and inter-token histograms,
KV-cache cells, model load time and GPU telemetry families in /metrics, the in-memory last hour at
/api/history, the Grafana dashboard's metric names, the status page's charts in Chromium, and
`aivailable status --watch`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from tests.nodeproc import REPO, get_json, serving

MODEL = "gemma-3-270m"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DASHBOARD = REPO / "deploy" / "grafana" / "aivailable.json"


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _families(text: str) -> set[str]:
    """Metric family names a /metrics text declares (TYPE lines), with their histogram/counter series."""
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            names |= {f"{name}_total", f"{name}_created"}
    return names


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("observe")
    with serving(tmp, "--model", f"{MODEL}={gemma_path}:1024", "--simulate-gpu", "labcard:6144",
                 "--history-interval-s", "1", "--log-format", "json", models=(MODEL,)) as n:
        client = OpenAI(base_url=n.api, api_key="none", max_retries=0, timeout=120)
        for i in range(3):
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count from {i} to {i + 9}."}],
                max_tokens=16, temperature=0, stream=True)
            assert sum(1 for _ in stream) > 0
        yield n


def _wait(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.5)
    raise TimeoutError(f"{what} not met after {timeout}s (last {last!r})")


def test_metrics_token_latency_kv_and_load_time(node):
    def counted():
        text = _metrics(node.url)
        n = _sample(text, "aivailable_time_to_first_token_seconds_count", model=MODEL)
        return text if n and n >= 3 else None

    text = _wait(counted, what="3 TTFT observations in /metrics")
    assert _sample(text, "aivailable_time_to_first_token_seconds_count", model=MODEL) == 3
    ttft_sum = _sample(text, "aivailable_time_to_first_token_seconds_sum", model=MODEL)
    assert ttft_sum is not None and ttft_sum > 0
    assert _sample(text, "aivailable_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") == 3
    # Inter-token gaps: one fewer than the tokens of each sequence; up to 15 per request of 16 tokens.
    itl = _sample(text, "aivailable_inter_token_latency_seconds_count", model=MODEL)
    completion = _sample(text, "aivailable_worker_tokens_total", model=MODEL, kind="completion")
    assert itl is not None and completion is not None
    assert 0 < itl <= completion - 1
    assert _sample(text, "aivailable_inter_token_latency_seconds_sum", model=MODEL) > 0
    total = _sample(text, "aivailable_kv_cache_total_cells", model=MODEL)
    used = _sample(text, "aivailable_kv_cache_used_cells", model=MODEL)
    assert total is not None and total >= 1024
    assert used is not None and 0 < used <= total  # the idle slot keeps the last conversation's prefix
    load = _sample(text, "aivailable_model_load_seconds", model=MODEL)
    assert load is not None and load > 0
    # A simulated GPU has no utilisation, temperature or power: the families exist, with no sample.
    fams = _families(text)
    for name in ("aivailable_gpu_utilization_percent", "aivailable_gpu_temperature_celsius",
                 "aivailable_gpu_power_watts"):
        assert name in fams
        assert _sample(text, name) is None


def test_history_keeps_per_model_and_per_gpu_series(node):
    def integral(h: dict) -> float:
        """Requests the series accounts for: each interval's rate times its length."""
        m = h["models"][MODEL]
        dts = [h["interval_s"]] + [b - a for a, b in zip(m["t"], m["t"][1:], strict=False)]
        return sum(r * dt for r, dt in zip(m["requests_per_s"], dts, strict=True))

    def ready():
        # The sampler runs once a second and may not have taken the last request's interval yet:
        # wait until the series has caught up with all 3 requests (or time out with what it has).
        h = get_json(node.url + "/api/history")
        m = h["models"].get(MODEL)
        if not (m and len(m["t"]) >= 2 and max(m["tokens_per_s"]) > 0):
            return None
        return h if integral(h) > 2.5 else None

    h = _wait(ready, what="history with tokens/s covering the 3 requests")
    assert h["interval_s"] == 1.0 and h["horizon_s"] == 3600.0
    m = h["models"][MODEL]
    assert len(m["t"]) == len(m["requests_per_s"]) == len(m["tokens_per_s"]) == len(m["ttft_s"])
    assert m["t"] == sorted(m["t"]) and abs(m["t"][-1] - time.time()) < 60
    assert any(x is not None and x > 0 for x in m["ttft_s"])
    # requests/s integrates back to exactly the 3 requests sent, not more
    assert integral(h) == pytest.approx(3, abs=0.05)
    g = h["gpus"]["sim:0"]
    assert g["name"] == "labcard" and g["vram_total_mib"] == 6144 and g["simulated"] is True
    assert g["vram_used_mib"][-1] > 0
    assert set(g["utilization_pct"]) == {None}


def test_grafana_dashboard_parses_and_uses_only_exported_metrics(node):
    dash = json.loads(DASHBOARD.read_text())
    exported = _families(_metrics(node.url))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set()
    for expr in exprs:
        used |= {n for n in re.findall(r"\b(aivailable_[a-z0-9_]+)", expr)}
    assert used, "the dashboard queries no aivailable metric"
    missing = used - exported
    assert not missing, f"the dashboard names metrics /metrics does not export: {sorted(missing)}"
    for key in ("aivailable_time_to_first_token_seconds_bucket", "aivailable_inter_token_latency_seconds_bucket",
                "aivailable_kv_cache_used_cells", "aivailable_gpu_utilization_percent"):
        assert key in used


def test_json_log_lines(node):
    lines = [ln for ln in node.log().splitlines() if ln.startswith("{")]
    assert lines, node.log()[-2000:]
    objs = [json.loads(ln) for ln in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(o) for o in objs)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", objs[0]["ts"])
    assert any("serving the OpenAI API" in o["msg"] for o in objs)


def test_status_watch_redraws_until_interrupted(node):
    proc = subprocess.Popen([sys.executable, "-m", "aivailable", "status", "--url", node.url, "--watch", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "COLUMNS": "200"}, start_new_session=True)
    try:
        time.sleep(4)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    text = out.decode()
    assert proc.returncode == 0, text
    assert text.count("Models") >= 2, text  # redrawn, not printed once
    assert MODEL in text
    assert "Traceback" not in text


def test_status_page_draws_history_charts(node, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is required for this test: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(f"{m.text} {m.location.get('url')}")
                    if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico") else None)
            page.goto(node.url + "/")
            tps = page.locator(f'.chart[data-series="model:{MODEL}:tokens_per_s"]')
            tps.wait_for(timeout=20_000)
            page.wait_for_function(
                f"""() => {{ const e = document.querySelector('.chart[data-series="model:{MODEL}:tokens_per_s"]');
                     return e && Number(e.dataset.points) >= 2 && Number(e.dataset.max) > 0; }}""", timeout=20_000)
            points = tps.locator("polyline").get_attribute("points")
            assert len(points.split()) >= 2
            box = tps.locator("svg").bounding_box()
            assert box and box["width"] > 50 and box["height"] > 20
            for series in ("requests_per_s", "ttft_s"):
                assert page.locator(f'.chart[data-series="model:{MODEL}:{series}"] polyline').count() == 1
            vram = page.locator('.chart[data-series="gpu:sim:0:vram_used_mib"]')
            assert int(vram.get_attribute("data-points")) >= 1
            assert "simulated" in page.locator('[data-series="gpu:sim:0:utilization_pct"]').inner_text()
            assert page.locator("#foreign").is_hidden()
            page.screenshot(path=str(tmp_path / "history.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()

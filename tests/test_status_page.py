"""The status page in headless Chromium (Debian's chromium driven by Playwright) shows GPU, VRAM bar, model."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest

from tests.nodeproc import serving

MODEL = "gemma-3-270m"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("status")
    with serving(tmp, "--model", f"{MODEL}={gemma_path}:1024", "--simulate-gpu", "labcard:6144", models=(MODEL,)) as n:
        yield n


def test_status_page_shows_gpu_vram_bar_and_model(node, tmp_path):
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is required for this test: apt-get install chromium (.ci/run does it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            forged = urllib.request.Request(node.url + "/_cluster/gossip", data=b"AIV\x01\x00\x02{}", method="POST")
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(forged, timeout=10)
            page.goto(node.url + "/")
            gpu = page.locator('.gpu[data-gpu-id="sim:0"]')
            gpu.wait_for(timeout=10_000)
            assert "labcard" in gpu.inner_text()
            assert "simulated" in gpu.inner_text()
            seg = gpu.locator(f'.vram-bar .vram-seg[data-model="{MODEL}"]')
            seg.wait_for(timeout=10_000)
            width = seg.evaluate("e => e.getBoundingClientRect().width")
            bar = gpu.locator(".vram-bar").evaluate("e => e.getBoundingClientRect().width")
            assert 0 < width < bar  # a real share of the card, not empty, not all of it
            row = page.locator(f'tr.model-row[data-model="{MODEL}"]')
            assert "ready" in row.inner_text()
            assert row.locator("td.unload").inner_text() == "never"  # keep_alive forever (the default)
            assert "KV f16" in row.locator(".kv").inner_text()  # each replica's KV cache type
            assert page.locator("#node-id").inner_text() == node.cluster()["node_id"]
            rejected = page.locator('#security tr.rejected[data-reason="plaintext"]')
            rejected.wait_for(timeout=10_000)  # the operator sees inter-node rejections by reason
            assert rejected.inner_text().split()[-1] == "1"
            assert "mutual TLS on port" in page.locator("#cluster-tls").inner_text()  # how nodes talk, at a glance
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()

"""Model files travel between real node processes on loopback: a replica placed on a node without the
file fetches it (and serves), a holder killed mid-transfer is replaced by another, and a holder that
serves corrupted bytes is caught, reported, and its data never loaded."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import openai
import pytest

from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest
from tests import peertls
from tests.nodeproc import NodeProc, free_port, start_node
from tests.test_cluster import wait_for

SECRET = "files-cluster-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small loadable gemma3 GGUF (about 4.5 MiB) and its sha256."""
    from tests.ggufgen import write_model

    path = write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "gemma3", 2, 256, 4, 1, 512, 8000, 2048)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another small gemma3 GGUF (other weights, so another sha256)."""
    from tests.ggufgen import write_model

    return write_model(tmp_path_factory.mktemp("other") / "other.gguf", "gemma3", 2, 256, 4, 1, 512, 8000, 2048,
                       seed=1)


def config(tmp, name: str, model_path, *, on: list[str]) -> str:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[[models]]\nname = "tiny"\npath = "{model_path}"\nctx = 512\n'
                   f'affinity = {{ nodes = {on!r} }}\n'.replace("'", '"'))
    return str(cfg)


def start(tmp, i: int, ports: dict[int, int], *extra: str, env: dict | None = None) -> NodeProc:
    args = ["--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET, "--node-id", f"n{i}", *extra]
    if i != 1:
        args += ["--join", f"127.0.0.1:{ports[1]}"]
    return start_node(tmp, *args, host=f"127.0.0.{i}", port=ports[i], name=f"n{i}", env=env)


def model(view: dict, name: str = "tiny") -> dict:
    return next((m for m in view["models"] if m["name"] == name), {"state": "absent", "reason": ""})


def transfers(node: NodeProc) -> list[dict]:
    return [t for t in node.cluster()["transfers"] if t["model"] == "tiny"]


def metric(node: NodeProc, name: str, labels: str = "") -> float:
    import urllib.request

    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}{{?{re.escape(labels)}}}? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def page_text(node: NodeProc, selector: str) -> str:
    """Text of `selector` on the node's status page in headless Chromium (no page errors allowed)."""
    from playwright.sync_api import sync_playwright

    from tests.test_status_page import CHROMIUM

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(node.url + "/")
            loc = page.locator(selector)
            loc.wait_for(timeout=10_000)
            text = loc.inner_text()
            assert not errors, errors
            return text
        finally:
            browser.close()


def post(node: NodeProc, body: bytes) -> tuple[int, bytes]:
    """POST /_cluster/files over the TLS cluster port, as a peer past TLS (holding the secret) would."""
    return peertls.post(node.url, "/_cluster/files", body, SECRET, "n9")


def stop_all(nodes: list[NodeProc]) -> None:
    for n in nodes:
        n.stop(timeout=15)


def test_a_replica_placed_without_the_file_fetches_verifies_loads_and_serves(tmp_path, tiny, other):
    path, sha = tiny
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2, 3)}
    dropped = tmp_path / "n3-models"  # n3 offers two dropped-in files: "extra", and a different "tiny"
    dropped.mkdir()
    (dropped / "extra.gguf").write_bytes(other.read_bytes())
    (dropped / "tiny.gguf").write_bytes(other.read_bytes())
    nodes = [start(tmp_path, 1, ports, "--config", config(tmp_path, "n1", path, on=["n2"]))]
    try:
        nodes[0].wait_healthy()
        nodes.append(start(tmp_path, 2, ports, "--bandwidth-mib-s", "2", "--chunk-mib", "0.5"))
        nodes.append(start(tmp_path, 3, ports, "--models-dir", str(dropped)))
        n1, n2, n3 = nodes
        seen: list[dict] = []

        def ready() -> bool:
            view = n3.cluster()
            m = model(view)
            if m["state"] == "fetching":
                seen.append({"reason": m["reason"], "transfers": view["transfers"]})
            return m["state"] == "ready"

        wait_for(ready, 120, "tiny fetched by n2 and ready", interval=0.2)
        m = model(n3.cluster())
        assert {r["node"] for r in m["replicas"] if r["state"] == "ready"} == {"n2"}
        assert m["sha256"] == sha and set(m["holders"]) == {"n1", "n2"}
        # The status seen from a third node showed the transfer with percent, rate and ETA.
        assert seen, "the model was never seen in state 'fetching'"
        assert any("n2 fetching its file" in x["reason"] and "MiB/s" in x["reason"] for x in seen), seen[-1]
        moving = [t for s in seen for t in s["transfers"] if t["node"] == "n2" and t["state"] == "fetching"]
        assert moving and {"percent", "rate_mib_s", "eta_s", "bytes_done", "size"} <= set(moving[-1])
        done = transfers(n2)[-1]
        assert done["state"] == "done" and done["percent"] == 100.0 and done["peers"] == {"n1": path.stat().st_size}
        fetched = n2.state_dir / "models" / "fetched" / f"{sha}.gguf"
        assert fetched.read_bytes() == path.read_bytes()
        assert any(e["text"].startswith("n2: fetched the file of tiny") for e in n2.cluster()["events"])
        assert metric(n2, "aivailable_file_bytes_received_total", 'peer="n1"') == path.stat().st_size
        assert metric(n2, "aivailable_file_transfers_total", 'outcome="done"') == 1
        assert metric(n1, "aivailable_file_bytes_served_total") == path.stat().st_size
        # Without the cluster secret a node's file endpoint gives nothing.
        assert post(n1, b"please send chunk 0") == (400, b"malformed")
        forged = envelope.seal(FileRequest(sha256=sha, chunk_size=1 << 20, chunk=0), b"guessed-secret", "n9",
                               time.time(), os.urandom(12))
        assert post(n1, forged) == (401, b"bad_signature")
        row = page_text(n3, 'tr.transfer-row[data-model="tiny"][data-node="n2"]')
        assert "done" in row and "100.0%" in row and "n1" in row
        client = openai.OpenAI(base_url=n3.api, api_key="x", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
        # n3's different "tiny" is a reported conflict (n1's configured definition wins), never merged.
        assert "defined differently on n1 and n3; using n1's definition" in model(n1.cluster())["reason"]
        assert any("model tiny is defined differently" in n.log() for n in nodes)
        # The dropped-in "extra" is offered to the whole cluster and loads on its first request.
        extra = model(n1.cluster(), "extra")
        assert extra["offered"] and extra["holders"] == ["n3"] and "loads on the first request" in extra["reason"]
        assert "extra" in {m.id for m in openai.OpenAI(base_url=n1.api, api_key="x").models.list()}
        first = wait_for(lambda: openai.OpenAI(base_url=n1.api, api_key="x", max_retries=0, timeout=60)
                         .chat.completions.create(model="extra", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2), 120, "extra served on demand")
        assert first.usage.completion_tokens >= 1
    finally:
        stop_all(nodes)


def test_killing_the_serving_holder_mid_transfer_resumes_from_another(tmp_path, tiny):
    path, sha = tiny
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2, 3)}
    nodes = [start(tmp_path, 1, ports, "--config", config(tmp_path, "n1", path, on=["n3"]))]
    try:
        nodes[0].wait_healthy()
        nodes.append(start(tmp_path, 2, ports, "--config", config(tmp_path, "n2", path, on=["n3"])))
        nodes.append(start(tmp_path, 3, ports, "--bandwidth-mib-s", "1", "--chunk-mib", "0.25"))
        n3 = nodes[2]
        t = wait_for(lambda: next((t for t in transfers(n3) if t["state"] == "fetching"
                                   and t["bytes_done"] >= 2**20), None), 120, "n3 fetching tiny")
        victim = max(t["peers"], key=t["peers"].get)
        survivor = {"n1": "n2", "n2": "n1"}[victim]
        nodes[int(victim[1]) - 1].kill_group()  # kill -9 the holder that served the most so far
        before = t["bytes_done"]
        wait_for(lambda: model(n3.cluster())["state"] == "ready", 120, "tiny ready on n3 after the kill")
        done = transfers(n3)[-1]
        assert done["state"] == "done" and done["peers"].get(survivor, 0) > t["peers"].get(survivor, 0)
        assert sum(done["peers"].values()) == path.stat().st_size and before < path.stat().st_size
        fetched = n3.state_dir / "models" / "fetched" / f"{sha}.gguf"
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == sha  # byte-identical
    finally:
        stop_all(nodes)


def test_a_holder_serving_corrupt_bytes_is_caught_reported_and_never_loaded(tmp_path, tiny):
    path, sha = tiny
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2)}
    # Fault injection in the peer process this test starts (see files/serve.py FAULT_CORRUPT_ENV).
    nodes = [start(tmp_path, 1, ports, "--config", config(tmp_path, "n1", path, on=["n2"]),
                   env={"AIVAILABLE_FAULT_CORRUPT_CHUNKS": "1"})]
    try:
        nodes[0].wait_healthy()
        nodes.append(start(tmp_path, 2, ports, "--chunk-mib", "1"))
        n2 = nodes[1]
        wait_for(lambda: model(n2.cluster())["state"] == "failed", 120, "tiny failed on n2")
        view = n2.cluster()
        m = model(view)
        assert "n2 could not fetch its file" in m["reason"] and "n1 (served corrupt data" in m["reason"]
        me = next(n for n in view["nodes"] if n["id"] == "n2")
        assert "n1" in me["bad_peers"] and "corrupt" in me["bad_peers"]["n1"]
        assert transfers(n2)[-1]["state"] == "failed"
        assert metric(n2, "aivailable_file_corrupt_chunks_total", 'peer="n1"') >= 1
        assert metric(n2, "aivailable_file_transfers_total", 'outcome="failed"') >= 1
        assert not list((n2.state_dir / "models" / "fetched").glob("*.gguf"))
        assert not any(r["node"] == "n2" for r in m["replicas"])  # never loaded
        assert "served corrupt data" in n2.log()
        table = subprocess.run([sys.executable, "-m", "aivailable", "status", "--url", n2.url], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})
        assert table.returncode == 0 and "Model-file transfers" in table.stdout and "failed" in table.stdout
        with pytest.raises(openai.APIStatusError) as err:
            openai.OpenAI(base_url=n2.api, api_key="x", max_retries=0).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert err.value.status_code == 503 and "corrupt" in err.value.message
    finally:
        stop_all(nodes)

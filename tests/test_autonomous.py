"""Availability before optimality, on five real nodes: kill -9 of three of them at once, among them every
holder of the model; the two survivors (a minority, so no coordinator) serve it again on their own GPU, and
once the three are back, one placement remains and the autonomous replica is retired without failing a
request."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request

import openai
import pytest

from tests.nodeproc import NodeProc, free_port, start_node
from tests.test_cluster import alive, wait_for

MODEL = "gemma-3-270m"
SECRET = "autonomous-test-secret-0123456789abcdef"
IDS = (1, 2, 3, 4, 5)


class Five:
    def __init__(self, tmp, gemma_path):
        self.tmp = tmp
        self.cfg = tmp / "models.toml"
        self.cfg.write_text('[node]\nautonomous_grace_s = 3\n\n'
                            f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 1024\n'
                            "min_replicas = 2\nmax_replicas = 2\n")
        self.ports = {i: free_port(f"127.0.0.{i}") for i in IDS}
        self.nodes: dict[int, NodeProc] = {}

    def start(self, i: int) -> NodeProc:
        seeds = [a for j in IDS if j != i for a in ("--join", f"127.0.0.{j}:{self.ports[j]}")]
        n = start_node(self.tmp, "--config", str(self.cfg), "--simulate-gpu", f"card{i}:2000",
                       "--cluster-secret", SECRET, "--node-id", f"n{i}", *seeds,
                       host=f"127.0.0.{i}", port=self.ports[i], name=f"n{i}")
        self.nodes[i] = n
        return n

    def stop(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.kill_group()


def replicas(view: dict) -> list[dict]:
    return [r for m in view["models"] if m["name"] == MODEL for r in m["replicas"]]


def ask(n: NodeProc) -> str:
    client = openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The sky is", max_tokens=2)
    raw.parse()
    return raw.headers.get("X-AIvailable-Replica", "")


def metric(n: NodeProc, name: str) -> float:
    text = urllib.request.urlopen(n.url + "/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture
def five(tmp_path, gemma_path):
    c = Five(tmp_path, gemma_path)
    try:
        for i in IDS:
            c.start(i)
        for n in c.nodes.values():
            n.wait_healthy(120)
        names = {f"n{i}" for i in IDS}
        wait_for(lambda: all(alive(n.cluster()) == names for n in c.nodes.values()), 120, "five nodes alive")
        wait_for(lambda: len([r for r in replicas(c.nodes[1].cluster()) if r["state"] == "ready"]) == 2, 180,
                 "two ready replicas")
        yield c
    finally:
        c.stop()


@pytest.mark.timeout(900)
def test_a_minority_serves_on_its_own_and_hands_back_without_failing_a_request(five):
    view = five.nodes[1].cluster()
    holders = {int(r["node"][1:]) for r in replicas(view) if r["state"] == "ready"}
    others = [i for i in IDS if i not in holders]
    killed = sorted(holders | {others[0]})
    survivors = [i for i in IDS if i not in killed]
    for i in killed:
        five.nodes[i].kill_group()
    entry = five.nodes[survivors[0]]

    # The survivors are 2 of 5 voters: no coordinator. Asked for the model, the entry node loads it itself.
    t0 = time.monotonic()
    served_by = wait_for(lambda: ask(entry), 240, "the minority serves the model again", interval=1.0)
    took = time.monotonic() - t0
    assert served_by.startswith(f"n{survivors[0]}/"), served_by
    mine = [r for r in replicas(entry.cluster()) if r["node"] == f"n{survivors[0]}"]
    assert mine and "no coordinator" in mine[0].get("autonomous", ""), mine
    print(f"served again {took:.1f} s after the kill")

    # A closed loop of requests through the survivor while the three come back.
    failures: list[str] = []
    done = threading.Event()
    sent = [0]

    def loop() -> None:
        while not done.is_set():
            try:
                ask(entry)
                sent[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.2)

    client = threading.Thread(target=loop)
    client.start()
    try:
        for i in killed:
            five.nodes[i] = five.start(i)
        for i in killed:
            five.nodes[i].wait_healthy(120)

        def healed() -> bool:
            views = [n.cluster() for n in five.nodes.values()]
            if any(alive(v) != {f"n{i}" for i in IDS} for v in views):
                return False
            lineage = {(v["leader"], v["term"], v["version"]) for v in views}
            reps = replicas(views[0])
            return (len(lineage) == 1 and views[0]["leader"] is not None
                    and not any(r.get("autonomous") for v in views for r in replicas(v))
                    and len([r for r in reps if r["state"] == "ready"]) >= 1)

        wait_for(healed, 300, "one placement, every node agreeing, no autonomous replica left", interval=1.0)
        time.sleep(2)
    finally:
        done.set()
        client.join(150)
    assert not failures, failures
    assert sent[0] > 0
    events = " ".join(e["text"] for e in entry.cluster()["events"])
    assert metric(entry, "aivailable_autonomous_retired_total") >= 1 or "adopts the autonomous replica" in events

"""Real node processes on 127.0.0.x forming one cluster: any-node routing, kill -9, restart, bad peers."""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests import peertls
from tests.nodeproc import NodeProc, free_port, get_json, start_node

MODELS = ("alpha", "beta", "gamma")
SECRET = "test-cluster-secret-0123456789abcdef"


def wait_for(pred, timeout: float, what: str, interval: float = 0.25):
    """Poll `pred` until truthy. Transient answers of a cluster in motion (a 503 while a model is
    re-placed or loads, a refused connection) are retried; any other error fails at once."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except openai.APIStatusError as e:
            if e.status_code not in (429, 503):
                raise
            last = f"{e.status_code}: {e.message}"
        except (urllib.error.URLError, OSError, ValueError, KeyError, openai.APIConnectionError) as e:
            last = repr(e)
        time.sleep(interval)
    raise TimeoutError(f"{what} (last: {last})")


def holders(view: dict, model: str) -> set[str]:
    return {r["node"] for m in view["models"] if m["name"] == model for r in m["replicas"] if r["state"] == "ready"}


def settled(view: dict) -> bool:
    """Every model placed, and every replica the placement names is ready (nothing still loading)."""
    for m in view["models"]:
        placed = {(r["node"], tuple(r["gpus"])) for r in m["placed_on"]}
        ready = {(r["node"], tuple(r["gpus"])) for r in m["replicas"] if r["state"] == "ready"}
        if not placed or placed != ready:
            return False
    return {m["name"] for m in view["models"]} == set(MODELS)


def alive(view: dict) -> set[str]:
    return {n["id"] for n in view["nodes"] if n["state"] == "alive"}


def ask(node: NodeProc, model: str, *, stream: bool = False) -> tuple[str, str]:
    """One chat request through `node`; returns (replica key that served it, text)."""
    client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=3, stream=stream)
    replica = raw.headers.get("X-AIvailable-Replica", "")
    parsed = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content
    return replica, text


class Cluster:
    def __init__(self, tmp, gemma_path):
        self.tmp, self.nodes = tmp, {}
        cfg = tmp / "models.toml"
        cfg.write_text("".join(f'[[models]]\nname = "{m}"\npath = "{gemma_path}"\nctx = 1024\nmax_replicas = 2\n\n'
                               for m in MODELS))
        self.cfg = cfg
        self.ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2, 3)}

    def start(self, i: int, join: bool = True) -> NodeProc:
        args = ["--config", str(self.cfg), "--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET,
                "--node-id", f"n{i}"]
        if join and i != 1:
            args += ["--join", f"127.0.0.1:{self.ports[1]}"]
        if join and i == 1 and self.nodes:  # a restarted first node rejoins through a survivor
            other = next(n for k, n in self.nodes.items() if k != 1 and n.proc.poll() is None)
            args += ["--join", f"{other.host}:{other.port}"]
        n = start_node(self.tmp, *args, host=f"127.0.0.{i}", port=self.ports[i], name=f"n{i}")
        self.nodes[i] = n
        return n

    def live(self) -> list[NodeProc]:
        return [n for n in self.nodes.values() if n.proc.poll() is None]

    def stop(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.stop(timeout=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gemma_path):
    c = Cluster(tmp_path_factory.mktemp("cluster"), gemma_path)
    try:
        c.start(1)
        c.nodes[1].wait_healthy()
        for i in (2, 3):
            c.start(i)
        for n in c.nodes.values():
            n.wait_healthy()
        wait_for(lambda: all(alive(n.cluster()) == {"n1", "n2", "n3"} for n in c.nodes.values()), 60,
                 "three nodes see each other alive")
        wait_for(lambda: settled(c.nodes[1].cluster()), 120, "every placed replica ready")
        yield c
    finally:
        c.stop()


def test_one_leader_and_whole_cluster_in_every_view(cluster):
    views = [n.cluster() for n in cluster.nodes.values()]
    leaders = {v["leader"] for v in views}
    assert len(leaders) == 1 and leaders.pop() in {"n1", "n2", "n3"}
    assert len({v["term"] for v in views}) == 1
    for v in views:
        assert {n["id"] for n in v["nodes"]} == {"n1", "n2", "n3"}
        assert all(len(n["gpus"]) == 1 and n["gpus"][0]["simulated"] for n in v["nodes"])
        assert {m["name"] for m in v["models"]} == set(MODELS)
        # VRAM never double-booked: what replicas claim on each card fits the card.
        for n in v["nodes"]:
            g = n["gpus"][0]
            assert sum(m["vram_mib"] for m in g["models"]) <= g["vram_total_mib"]


def test_every_model_answers_through_every_node(cluster):
    view = cluster.nodes[1].cluster()
    proxied = 0
    for model in MODELS:
        for i, node in cluster.nodes.items():
            for stream in (False, True):
                replica, text = ask(node, model, stream=stream)
                assert isinstance(text, str)
                owner = replica.split("/", 1)[0]
                assert owner in holders(view, model), (model, replica)
                proxied += owner != f"n{i}"
    assert proxied > 0, "no request was proxied to a peer"


def test_forged_and_oversized_peer_messages_are_rejected_and_counted(cluster):
    """Garbage from a peer that holds the cluster's credentials (past TLS): refused by the envelope checks."""
    node = cluster.nodes[2]
    bad = [b"", b"{not json", b"\x00" * 64, b"x" * (2 << 20)]
    for body in bad:
        status, _ = peertls.post(node.url, "/_cluster/gossip", body, SECRET, "n1")
        assert 400 <= status < 500
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "aivailable_cluster_rejected_total" in metrics
    assert SECRET not in metrics and SECRET not in node.log()
    assert ask(node, MODELS[0])[1] is not None  # unharmed


def test_signed_but_replayed_or_stale_or_wrong_secret_messages_are_rejected(cluster):
    """A captured valid message sent again, an old one, and one signed with another secret: all dropped."""
    import secrets as pysecrets

    from aivailable.gossip.envelope import seal
    from aivailable.gossip.messages import Ping

    node = cluster.nodes[3]

    def post(data: bytes) -> int:
        return peertls.post(node.url, "/_cluster/gossip", data, SECRET, "n1")[0]

    valid = seal(Ping(seq=1, target="n3"), SECRET, "n1", time.time(), pysecrets.token_hex(8))
    assert post(valid) < 300
    assert post(valid) >= 400  # replayed
    assert post(seal(Ping(seq=2, target="n3"), SECRET, "n1", time.time() - 3600, pysecrets.token_hex(8))) >= 400
    assert post(seal(Ping(seq=3, target="n3"), "another-secret-0123456789", "n1", time.time(),
                     pysecrets.token_hex(8))) >= 400
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    for reason in ("replayed", "stale", "bad_signature"):
        assert f'aivailable_cluster_rejected_total{{reason="{reason}"}}' in metrics, reason
    assert alive(node.cluster()) == {"n1", "n2", "n3"}


def test_kill_leader_then_holder_then_restart(cluster):
    view = cluster.nodes[1].cluster()
    leader, term = view["leader"], view["term"]
    li = int(leader[1:])
    cluster.nodes[li].kill_group()
    survivors = [n for i, n in cluster.nodes.items() if i != li]
    # A new leader of a higher term; every model is served again through every survivor.
    wait_for(lambda: all((v := s.cluster())["leader"] not in (None, leader) and v["term"] > term
                         for s in survivors), 30, "new leader elected")
    for model in MODELS:
        for s in survivors:
            wait_for(lambda s=s, model=model: ask(s, model)[0], 90, f"{model} served via {s.url} after leader death")

    # Restart the dead node with its state directory: it rejoins and gets work again.
    restarted = cluster.start(li)
    restarted.wait_healthy()
    wait_for(lambda: alive(survivors[0].cluster()) == {"n1", "n2", "n3"}, 60, "restarted node alive again")
    wait_for(lambda: any(f"n{li}" in holders(survivors[0].cluster(), m) for m in MODELS), 120,
             "restarted node holds a replica")

    # kill -9 a node that holds a model; the model stays (or comes back) on a survivor.
    view = restarted.cluster()
    victim_id = next(iter(holders(view, MODELS[0])))
    vi = int(victim_id[1:])
    cluster.nodes[vi].kill_group()
    rest = [n for i, n in cluster.nodes.items() if i != vi]
    wait_for(lambda: victim_id not in alive(rest[0].cluster()), 30, "dead node detected")
    for s in rest:
        wait_for(lambda s=s: ask(s, MODELS[0])[0].split("/")[0] != victim_id, 90,
                 "model re-placed on a survivor")
    final = rest[0].cluster()
    assert holders(final, MODELS[0]) and victim_id not in holders(final, MODELS[0])


def test_cluster_status_page_json_reachable_from_any_node(cluster):
    for n in cluster.live():
        v = get_json(n.url + "/api/cluster")
        assert v["node_id"] in {"n1", "n2", "n3"}
        assert any(e["text"] for e in v["events"])

"""mDNS discovery for real (zeroconf 0.154), following TESTING.md: explicit loopback addresses in the host
namespace; default interface choice only inside private network namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aivailable.gossip.discovery import Discovery
from aivailable.gossip.envelope import cluster_id_hash
from tests.netns import namespaces

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = cluster_id_hash(b"discovery-test-secret-0123456789")
OTHER = cluster_id_hash(b"some-other-cluster-secret-987654")


def test_two_nodes_find_each_other_and_ignore_another_cluster():
    asyncio.run(_one_namespace())


async def _one_namespace() -> None:
    found: dict[str, list[str]] = {"a": [], "b": [], "x": []}
    a = Discovery("node-a", "127.0.0.1", 18001, CLUSTER, ["127.0.0.1"], found["a"].append)
    b = Discovery("node-b", "127.0.0.2", 18002, CLUSTER, ["127.0.0.2"], found["b"].append)
    x = Discovery("node-x", "127.0.0.3", 18003, OTHER, ["127.0.0.3"], found["x"].append)
    started = []
    try:
        for d in (a, b, x):
            await d.start()
            started.append(d)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not (found["a"] and found["b"] and a.ignored and b.ignored):
            await asyncio.sleep(0.05)
        assert found["a"] == ["127.0.0.2:18002"]
        assert found["b"] == ["127.0.0.1:18001"]
        # x was seen (so the filter was exercised) but never reported; x sees only strangers.
        assert a.ignored == {"node-x._aivailable._tcp.local."} and "node-x" not in a.peers
        assert b.ignored == {"node-x._aivailable._tcp.local."}
        assert found["x"] == []
        txt = {k.decode(): v.decode() for k, v in a._info.properties.items()}
        assert txt == {
            "v": "1",
            "cluster": CLUSTER,
            "node": "node-a",
            "addr": "127.0.0.1:18001",
            "port": "18001",
        }
    finally:
        for d in started:
            await d.stop()


def test_mdns_alone_forms_a_cluster_of_two_new_transports(tmp_path):
    """Zero configuration: no seeds; discovery feeds transport.join; the lowest id founds the cluster."""
    asyncio.run(_zero_config(tmp_path))


async def _zero_config(tmp_path: Path) -> None:
    from tests.test_transport import SECRET, Node, agreed, wait_for

    nodes = [
        Node(nid, tmp_path / nid, host=host) for nid, host in (("zed", "127.0.0.1"), ("amy", "127.0.0.2"))
    ]
    cluster = cluster_id_hash(SECRET)
    mdns = [Discovery(n.id, n.host, n.port, cluster, [n.host], lambda a, n=n: n.t.join([a])) for n in nodes]
    try:
        for n, d in zip(nodes, mdns, strict=True):
            await n.start()
            await d.start()
        await wait_for(lambda: agreed(nodes), what="a cluster from mDNS alone")
        assert nodes[1].t.is_leader and nodes[1].t.voters == ("amy", "zed")
    finally:
        for n, d in zip(nodes, mdns, strict=True):
            await d.stop()
            if n.t.running:
                await n.stop()


def test_two_processes_in_separate_namespaces_discover_each_other_with_default_interfaces():
    procs: list[subprocess.Popen] = []
    with namespaces(2) as spaces:
        nss = [ns for ns, _addr in spaces]
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            for i, ns in enumerate(nss, start=1):
                cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.discovery_peer"]
                cmd += ["--node", f"n{i}", "--port", "8000", "--cluster", CLUSTER, "--expect", f"n{3 - i}"]
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    )
                )
            results = []
            for p in procs:
                out, err = p.communicate(timeout=30)
                assert p.returncode == 0, f"peer failed: {out} {err}"
                results.append(json.loads(out.strip().splitlines()[-1]))
            assert results[0]["addr"] == "10.77.0.1:8000" and results[1]["addr"] == "10.77.0.2:8000"
            assert results[0]["peers"] == {"n2": "10.77.0.2:8000"}
            assert results[1]["peers"] == {"n1": "10.77.0.1:8000"}
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)


def test_a_spoofed_mdns_record_neither_stops_a_new_node_founding_nor_draws_gossip_forever(tmp_path):
    """Issue 20 defect 2: anyone can read the cluster id from an announcement and announce a record of
    their own. Announced before a fresh node starts, at an address that answers 204 but holds no secret,
    it must not keep the node from founding its cluster, and the node must stop sending there."""
    secret = "spoof-test-secret-0123456789abcdef"
    procs: list[subprocess.Popen] = []
    with namespaces(2) as spaces:
        (ns_fake, fake_ip), (ns_node, node_ip) = spaces
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
            spoof = subprocess.Popen(
                ["ip", "netns", "exec", ns_fake, sys.executable, "-m", "tests.mdns_spoof", "--host", fake_ip,
                 "--port", "9000", "--cluster", cluster_id_hash(secret.encode()), "--duration", "40"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            procs.append(spoof)
            assert spoof.stdout is not None and spoof.stdout.readline().strip() == "announced"
            time.sleep(1.0)  # the record is out before the node starts
            node_env = {**env, "AIVAILABLE_PROFILE": "local"}
            log = (tmp_path / "node.log").open("w")
            node = subprocess.Popen(
                ["ip", "netns", "exec", ns_node, sys.executable, "-m", "aivailable", "up", "--host", node_ip,
                 "--port", "8000", "--state-dir", str(tmp_path / "state"), "--node-id", "zz-node",
                 "--simulate-gpu", "sim0:1000", "--cluster-secret", secret],
                cwd=ROOT, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            procs.append(node)
            probe = ("import json,sys,urllib.request;print(json.dumps(json.load(urllib.request.urlopen("
                     f"'http://{node_ip}:8000/api/cluster', timeout=2))))")
            view: dict = {}
            deadline = time.monotonic() + 25.0
            while time.monotonic() < deadline:
                r = subprocess.run(["ip", "netns", "exec", ns_node, sys.executable, "-c", probe],
                                   capture_output=True, text=True, timeout=20)
                if r.returncode == 0:
                    view = json.loads(r.stdout)
                    if view.get("leader") == "zz-node":
                        break
                time.sleep(0.5)
            log_text = (tmp_path / "node.log").read_text()
            assert view.get("leader") == "zz-node" and view.get("term", 0) >= 1, (view, log_text[-3000:])
            out, err = spoof.communicate(timeout=60)
            posts = json.loads(out.strip().splitlines()[-1])["posts"]
            log_text = (tmp_path / "node.log").read_text()
            # The node did find the record (so this test exercised discovery) and pushed to it a few times,
            # then forgot it: nothing in the last 15 s of the spoofer's 40.
            assert 1 <= len(posts) <= 3, (posts, log_text[-3000:])
            assert max(posts) < 25.0, posts
            assert "forgot the peer announced at" in log_text
        finally:
            for p in procs:  # the node runs in its own session (group); the spoofer is one process
                if p.poll() is None:
                    if p is procs[0]:
                        p.kill()
                    else:
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)


def test_a_flood_of_announced_names_is_resolved_a_few_at_a_time():
    """Rate limit on what discovery takes in: a burst of fake names starts at most MAX_RESOLVING lookups."""
    from zeroconf import ServiceStateChange

    from aivailable.gossip.discovery import MAX_RESOLVING, SERVICE_TYPE

    async def flood() -> None:
        d = Discovery("node-a", "127.0.0.1", 18001, CLUSTER, ["127.0.0.1"], lambda addr: None)
        for i in range(100):
            d._on_change(None, SERVICE_TYPE, f"fake{i}.{SERVICE_TYPE}", ServiceStateChange.Added)
        assert len(d._resolving) == MAX_RESOLVING and d.dropped == 100 - MAX_RESOLVING
        await asyncio.gather(*d._resolving.values())  # not started: each returns at once
        assert d.peers == {}

    asyncio.run(flood())

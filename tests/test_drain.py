"""Maintenance drains: the pure rules, then two real nodes drained under a closed loop of requests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import openai
import pytest

from aivailable import maintenance
from aivailable.admin_cli import remaining
from aivailable.clusterview import MemberInfo, build_view
from aivailable.coordinator import NodeFacts, build_problem
from aivailable.errors import AuthenticationError, Forbidden, InvalidRequest
from aivailable.maintenance import Drain
from aivailable.statedir import StateDirError
from tests.nodeproc import REPO, NodeProc, free_port, start_node
from tests.test_cluster import SECRET, alive, holders, wait_for

MODEL = "alpha"
API_KEY = "drain-test-api-key"

# ---- the pure rules ----------------------------------------------------------------------------------


def test_drain_file_round_trip_and_missing_file_means_nothing_drained(tmp_path):
    path = tmp_path / maintenance.DRAIN_FILE
    assert maintenance.load(path) == Drain()
    d = Drain(node=False, gpus=frozenset({"sim:1", "sim:0"}))
    maintenance.save(path, d)
    assert json.loads(path.read_text()) == {"node": False, "gpus": ["sim:0", "sim:1"]}
    assert maintenance.load(path) == d
    maintenance.save(path, Drain())  # undrained: no file left behind
    assert not path.exists() and maintenance.load(path) == Drain()


@pytest.mark.parametrize("text, field", [("{", "JSON"), ('["x"]', "JSON object"), ('{"node": 1}', "'node'"),
                                         ('{"gpus": "sim:0"}', "'gpus'"), ('{"gpus": [""]}', "'gpus'")])
def test_a_bad_drain_file_is_refused_naming_the_file_and_field(tmp_path, text, field):
    path = tmp_path / maintenance.DRAIN_FILE
    path.write_text(text)
    with pytest.raises(StateDirError) as e:
        maintenance.load(path)
    assert str(path) in e.value.message and field in e.value.message


@pytest.mark.parametrize("before, gpu, drained, after", [
    (Drain(), None, True, Drain(node=True)),
    (Drain(), "g1", True, Drain(gpus=frozenset({"g1"}))),
    (Drain(gpus=frozenset({"g1"})), "g0", True, Drain(gpus=frozenset({"g0", "g1"}))),
    (Drain(gpus=frozenset({"g0", "g1"})), "g0", False, Drain(gpus=frozenset({"g1"}))),
    (Drain(node=True, gpus=frozenset({"g1"})), None, False, Drain()),  # undrain the node: everything
    (Drain(node=True), "g1", False, Drain(node=True)),
])
def test_drain_and_undrain_change_the_state(before, gpu, drained, after):
    assert maintenance.change(before, gpu=gpu, drained=drained, devices=["g0", "g1"]) == after


@pytest.mark.parametrize("gpu", ["g9", "", 3, ["g0"]])
def test_an_unknown_gpu_is_refused_naming_gpu(gpu):
    with pytest.raises(InvalidRequest) as e:
        maintenance.change(Drain(), gpu=gpu, drained=True, devices=["g0", "g1"])
    assert e.value.param == "gpu" and "g0, g1" in e.value.message


def _facts(node: str, **kw) -> NodeFacts:
    dev = [{"id": g, "vendor": "sim", "name": "sim", "vram_total_mib": 4000, "simulated": True} for g in ("g0", "g1")]
    cat = [{"name": "m1", "path": "/m.gguf"}]
    return NodeFacts(node, f"{node}:1", devices=dev, catalog=cat, needs_mib={"m1": 500.0}, **kw)


def test_drained_gpus_and_nodes_get_nothing_in_the_placement_problem():
    prev = {"m1": [{"node": "a", "gpus": ["g0"], "split": None}]}
    plain = build_problem([_facts("a"), _facts("b")], prev)
    assert [g.id for g in plain.gpus] == ["a/g0", "a/g1", "b/g0", "b/g1"] and plain.previous["m1"]
    one = build_problem([_facts("a", drained_gpus=["g0"]), _facts("b")], prev)
    assert [g.id for g in one.gpus] == ["a/g1", "b/g0", "b/g1"]
    assert not any(one.previous.values())  # the replica on the drained GPU is re-placed
    whole = build_problem([_facts("a", drained=True), _facts("b")], prev)
    assert [g.node for g in whole.gpus] == ["b", "b"]
    assert whole.models[0].files_on == ["a", "b"]  # a drained node still serves its files to peers


def test_facts_carry_a_drain_only_when_there_is_one():
    assert "drained" not in _facts("a").to_dict() and "drained_gpus" not in _facts("a").to_dict()
    d = _facts("a", drained_gpus=["g1"]).to_dict()
    assert NodeFacts.from_dict(d).drained_gpus == ["g1"] and d["drained"] is False
    assert maintenance.excluded_devices(NodeFacts.from_dict(_facts("a", drained=True).to_dict())) == {"g0", "g1"}


def test_handed_over_needs_a_ready_replica_that_no_drain_or_leave_covers():
    old = {"model": "m1", "state": "ready", "drained": True}
    assert not maintenance.handed_over("m1", [old])
    assert not maintenance.handed_over("m1", [old, {"model": "m1", "state": "loading"}])
    assert not maintenance.handed_over("m1", [old, {"model": "m1", "state": "ready", "leaving": True}])
    assert not maintenance.handed_over("m1", [old, {"model": "m2", "state": "ready"}])
    assert maintenance.handed_over("m1", [old, {"model": "m1", "state": "ready"}])


@pytest.mark.parametrize("since, outstanding, stop", [
    (None, 0, False), (0.5, 0, False), (1.0, 0, True), (5.0, 2, False), (60.0, 2, True)])
def test_a_drained_replica_stops_after_the_settle_time_once_idle(since, outstanding, stop):
    assert maintenance.may_stop(handed_over_for_s=since, outstanding=outstanding, settle_s=1.0, grace_s=60.0) is stop


def test_admin_key_is_derived_from_the_secret_and_checked_apart_from_api_keys():
    key = maintenance.admin_key(b"s1")
    assert key == maintenance.admin_key(b"s1") != maintenance.admin_key(b"s2")
    assert key.startswith(maintenance.ADMIN_PREFIX) and "s1" not in key
    maintenance.check_admin(f"Bearer {key}", key, ["k1"])
    for header in (None, "", "Bearer ", f"Basic {key}"):
        with pytest.raises(AuthenticationError, match="Missing admin key"):
            maintenance.check_admin(header, key, ["k1"])
    with pytest.raises(AuthenticationError, match="Incorrect"):
        maintenance.check_admin(f"Bearer {key}x", key, ["k1"])
    with pytest.raises(Forbidden):
        maintenance.check_admin("Bearer k1", key, ["k1"])


def test_cluster_view_and_cli_show_what_is_drained():
    reps = [{"model": "m1", "gpus": ["g0"], "state": "ready", "drained": True}]
    a = MemberInfo("a", "a:1", "alive", _facts("a", drained_gpus=["g0"], replicas=reps))
    view = build_view(self_id="a", leader="a", term=1, version=1, backend="cpu", placement={}, unplaced={},
                      events=[], members=[a, MemberInfo("b", "b:1", "alive", _facts("b"))])
    nodes = {n["id"]: n for n in view["nodes"]}
    assert nodes["a"]["drained_gpus"] == ["g0"] and not nodes["a"]["drained"]
    assert [g["drained"] for g in nodes["a"]["gpus"]] == [True, False]
    assert not any(g["drained"] for g in nodes["b"]["gpus"])
    assert remaining(view, "a", "g0") == ["m1 on a:g0 (ready)"]
    assert remaining(view, "a", "g1") == [] and remaining(view, "b", None) == []


def test_a_node_with_a_bad_drain_file_refuses_to_start_naming_it(tmp_path):
    (tmp_path / maintenance.DRAIN_FILE).write_text('{"node": "yes"}')
    r = cli("up", "--state-dir", str(tmp_path), "--simulate-gpu", "a:1000", "--port", str(free_port()), "--no-mdns")
    assert r.returncode != 0 and "drain.json" in r.stderr and "'node'" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_cli_names_what_is_wrong(tmp_path):
    r = cli("drain", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", "k")
    assert r.returncode == 1 and "--url: cannot reach" in r.stderr, r.stderr
    r = cli("drain", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "--state-dir: no cluster secret" in r.stderr, r.stderr
    r = cli("undrain", "--admin-key", "k", "--admin-key-file", str(tmp_path / "f"))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr


# ---- real nodes -------------------------------------------------------------------------------------


class Loop:
    """Closed-loop client through the official openai client: short chats until stopped; every failure kept."""

    def __init__(self, node: NodeProc):
        self.client = openai.OpenAI(base_url=node.api, api_key=API_KEY, max_retries=0, timeout=120)
        self.ok, self.failed, self.replicas = 0, [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
                raw.parse()
                self.ok += 1
                self.replicas.append(raw.headers.get("X-AIvailable-Replica", ""))
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                self.failed.append(repr(exc))

    def __enter__(self) -> Loop:
        self._t.start()
        wait_for(lambda: self.ok >= 2, 120, "closed loop running")
        return self

    def __exit__(self, *exc) -> None:
        n = self.ok
        wait_for(lambda: self.ok >= n + 3, 120, "requests served after the drain")
        self._stop.set()
        self._t.join(150)


def admin(node: NodeProc, action: str, body: bytes = b"{}", key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{node.url}/admin/{action}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aivailable", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=400)


def node_args(cfg, i: int, join: int | None) -> list[str]:
    args = ["--config", str(cfg), "--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET, "--node-id",
            f"n{i}", "--api-key", API_KEY]
    return args + (["--join", f"127.0.0.1:{join}"] if join else [])


@pytest.fixture(scope="module")
def pair(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("drain")
    cfg = tmp / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 512\nmax_replicas = 1\n')
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2)}
    nodes: dict[str, NodeProc] = {}
    try:
        for i in (1, 2):
            nodes[f"n{i}"] = start_node(tmp, *node_args(cfg, i, ports[1] if i == 2 else None), host=f"127.0.0.{i}",
                                        port=ports[i], name=f"n{i}")
        for n in nodes.values():
            n.wait_healthy(120)
        wait_for(lambda: all(alive(n.cluster()) == set(nodes) for n in nodes.values()), 120, "two nodes alive")
        wait_for(lambda: all(holders(n.cluster(), MODEL) for n in nodes.values()), 240, f"{MODEL} ready")
        yield tmp, cfg, ports, nodes
    finally:
        for n in nodes.values():
            n.kill_group()


def test_admin_endpoints_refuse_missing_wrong_and_api_keys(pair):
    _tmp, _cfg, _ports, nodes = pair
    n1 = nodes["n1"]
    for key, status in ((None, 401), ("aiv-admin-wrong", 401), (API_KEY, 403)):
        code, body = admin(n1, "drain", key=key)
        assert code == status and body["error"]["message"], (key, code, body)
    code, body = admin(n1, "drain", b'{"gpu": "sim:9"}', key=maintenance.admin_key(SECRET.encode()))
    assert code == 400 and body["error"]["param"] == "gpu", body
    code, body = admin(n1, "drain", b'{"gpus": 1}', key=maintenance.admin_key(SECRET.encode()))
    assert code == 400 and body["error"]["param"] == "gpus", body
    assert not any(n["drained"] or n["drained_gpus"] for n in n1.cluster()["nodes"])  # nothing changed


def test_drain_moves_the_model_without_a_failed_request_and_survives_a_restart(pair):
    tmp, cfg, ports, nodes = pair
    (holder,) = holders(nodes["n1"].cluster(), MODEL)
    other = "n2" if holder == "n1" else "n1"
    h, o = nodes[holder], nodes[other]
    secret, key_file = tmp / "secret", tmp / "admin_key"
    secret.write_text(SECRET + "\n")
    key_file.write_text(cli("admin-key", "--cluster-secret-file", str(secret)).stdout)
    with Loop(h) as loop:  # through the drained node itself: it keeps serving while the model moves
        done = cli("drain", "--url", h.url, "--cluster-secret-file", str(secret), "--timeout", "300")
    assert done.returncode == 0, done.stdout + done.stderr + h.log()[-3000:]
    assert "nothing runs there any more" in done.stdout, done.stdout
    assert loop.failed == [], loop.failed[:3]
    assert loop.replicas[0].startswith(f"{holder}/") and loop.replicas[-1].startswith(f"{other}/")
    assert holders(o.cluster(), MODEL) == {other}
    assert "is ready elsewhere; stopping its replica" in h.log(), h.log()[-3000:]

    # The drain survives a restart of the drained node: it gets nothing back.
    assert h.stop(timeout=120) == 0
    i = int(holder[1])
    h = nodes[holder] = start_node(tmp, *node_args(cfg, i, ports[1] if i == 2 else ports[2]),
                                   host=f"127.0.0.{i}", port=ports[i], name=holder)  # same state dir
    h.wait_healthy(120)
    wait_for(lambda: alive(o.cluster()) == {"n1", "n2"}, 120, "drained node back")
    view = o.cluster()
    assert next(n for n in view["nodes"] if n["id"] == holder)["drained"], view["nodes"]
    assert holders(view, MODEL) == {other}

    # Undrain, then drain the other node's GPU: the model comes back, so the node is placeable again.
    done = cli("undrain", "--url", h.url, "--admin-key", maintenance.admin_key(SECRET.encode()))
    assert done.returncode == 0 and "undrained" in done.stdout, done.stdout + done.stderr
    wait_for(lambda: not next(n for n in o.cluster()["nodes"] if n["id"] == holder)["drained"], 60,
             "peers know the undrain")
    wait_for(lambda: holders(h.cluster(), MODEL), 120, f"{holder} sees {MODEL} ready")
    gpu = next(n for n in o.cluster()["nodes"] if n["id"] == other)["gpus"][0]["id"]
    with Loop(h) as loop:
        done = cli("drain", "--url", o.url, "--gpu", gpu, "--admin-key-file", str(key_file), "--timeout", "300")
    assert done.returncode == 0, done.stdout + done.stderr + o.log()[-3000:]
    assert loop.failed == [], loop.failed[:3]
    assert holders(h.cluster(), MODEL) == {holder}
    assert next(n for n in h.cluster()["nodes"] if n["id"] == other)["drained_gpus"] == [gpu]

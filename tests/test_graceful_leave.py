"""Graceful shutdown (SIGTERM): models handed over before the node stops, streams finish, exit 0."""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from aivailable.clusterview import MemberInfo, build_view
from aivailable.coordinator import NodeFacts, build_problem
from aivailable.leave import pending_handover, takers
from tests.nodeproc import NodeProc, free_port, start_node
from tests.test_cluster import SECRET, alive, holders, wait_for

MODEL = "alpha"


# ---- the pure rules ----------------------------------------------------------------------------------


def member(node: str, state: str = "alive", leaving: bool = False, ready: tuple[str, ...] = (),
           loading: tuple[str, ...] = ()) -> MemberInfo:
    reps = [{"model": m, "gpus": ["g0"], "state": "ready"} for m in ready]
    reps += [{"model": m, "gpus": ["g0"], "state": "loading"} for m in loading]
    return MemberInfo(node, f"{node}:1", state, NodeFacts(node, f"{node}:1", replicas=reps, leaving=leaving))


def test_handover_waits_for_a_ready_replica_on_a_live_peer_that_stays():
    me = member("a", leaving=True, ready=("m1", "m2"))
    peers = [member("b", loading=("m1",)), member("c", leaving=True, ready=("m2",)), member("d", "dead", ready=("m2",))]
    assert takers([me, *peers], "a") == ["b"]
    assert pending_handover({"m1", "m2"}, [me, *peers], "a") == ["m1", "m2"]
    peers[0] = member("b", ready=("m1", "m2"))
    assert pending_handover({"m1", "m2"}, [me, *peers], "a") == []
    assert takers([me], "a") == [] and pending_handover({"m1"}, [me], "a") == ["m1"]


def test_leaving_node_gets_no_gpu_and_holds_no_file_in_the_placement_problem():
    dev = [{"id": "g0", "vendor": "sim", "name": "sim", "vram_total_mib": 4000, "simulated": True}]
    cat = [{"name": "m1", "path": "/m.gguf"}]
    facts = [NodeFacts(n, f"{n}:1", devices=dev, catalog=cat, needs_mib={"m1": 500.0}, leaving=n == "a")
             for n in ("a", "b")]
    prev = {"m1": [{"node": "a", "gpus": ["g0"], "split": None}]}
    p = build_problem(facts, prev)
    assert [g.node for g in p.gpus] == ["b"]
    assert p.models[0].files_on == ["b"] and not any(p.previous.values())


def test_cluster_view_marks_a_leaving_node_for_the_operator():
    view = build_view(self_id="a", leader="a", term=1, version=1, backend="cpu", placement={}, unplaced={},
                      events=[], members=[member("a"), member("b", leaving=True), member("c", "dead", leaving=True)])
    assert {n["id"]: n["leaving"] for n in view["nodes"]} == {"a": False, "b": True, "c": False}


# ---- real nodes -------------------------------------------------------------------------------------


class Loop:
    """Closed-loop client: short chat requests through one node until stopped; every failure kept."""

    def __init__(self, node: NodeProc):
        self.client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=60)
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
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(90)


class Stream:
    """One long streamed completion in a thread: first chunk seen, how it ended."""

    def __init__(self, node: NodeProc):
        self.client = openai.OpenAI(base_url=node.api, api_key="x", max_retries=0, timeout=120)
        self.first = threading.Event()
        self.finish: str | None = None
        self.chunks = 0
        self.error: str | None = None
        self.replica = ""
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            raw = self.client.completions.with_raw_response.create(
                model=MODEL, prompt="Count from one to one hundred: one, two, three,", max_tokens=64, stream=True)
            self.replica = raw.headers.get("X-AIvailable-Replica", "")
            for c in raw.parse():
                self.chunks += 1
                self.first.set()
                if c.choices and c.choices[0].finish_reason:
                    self.finish = c.choices[0].finish_reason
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)
        finally:
            self.first.set()

    def join(self) -> None:
        self._t.join(120)


def sigterm_and_wait(n: NodeProc, timeout: float = 120.0) -> int:
    os.killpg(n.proc.pid, signal.SIGTERM)
    return n.proc.wait(timeout)


def leave_under_load(leaving: NodeProc, via: NodeProc) -> tuple[Loop, Stream, int]:
    """A stream in flight on `leaving` and a closed loop through `via` while `leaving` gets SIGTERM."""
    # The loop counts every failure, so it may start only once `via` itself knows a ready replica (the
    # fixture waited for n1's view; gossip takes a moment to bring it to the others).
    wait_for(lambda: holders(via.cluster(), MODEL), 30, f"{via.host} sees {MODEL} ready")
    with Loop(via) as loop:
        wait_for(lambda: loop.ok >= 2, 60, "closed loop running")
        stream = Stream(leaving)
        assert stream.first.wait(60), "no first chunk"
        assert stream.error is None, stream.error
        rc = sigterm_and_wait(leaving)
        stream.join()
        n = loop.ok
        wait_for(lambda: loop.ok >= n + 3, 60, "requests served after the node left")
    return loop, stream, rc


@pytest.fixture(scope="module")
def trio(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("leave")
    cfg = tmp / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 512\nmax_replicas = 1\n')
    ports = {i: free_port(f"127.0.0.{i}") for i in (1, 2, 3)}
    nodes: dict[str, NodeProc] = {}
    try:
        for i in (1, 2, 3):
            args = ["--config", str(cfg), "--simulate-gpu", f"card{i}:2000", "--cluster-secret", SECRET,
                    "--node-id", f"n{i}"]
            if i != 1:
                args += ["--join", f"127.0.0.1:{ports[1]}"]
            nodes[f"n{i}"] = start_node(tmp, *args, host=f"127.0.0.{i}", port=ports[i], name=f"n{i}")
        for n in nodes.values():
            n.wait_healthy()
        wait_for(lambda: all(alive(n.cluster()) == set(nodes) for n in nodes.values()), 60, "three nodes alive")
        wait_for(lambda: holders(nodes["n1"].cluster(), MODEL), 120, f"{MODEL} ready")
        yield nodes
    finally:
        for n in nodes.values():
            n.kill_group()


def test_sigterm_hands_models_over_then_drains_and_exits_0(trio):
    view = trio["n1"].cluster()
    (holder,) = holders(view, MODEL)
    via = next(n for k, n in trio.items() if k != holder)
    loop, stream, rc = leave_under_load(trio[holder], via)
    log = trio[holder].log()
    assert rc == 0, log[-2000:]
    assert stream.error is None and stream.finish in ("stop", "length"), (stream.error, stream.finish)
    assert stream.replica.startswith(f"{holder}/")  # the stream really ran on the leaving node
    assert loop.failed == [], loop.failed[:3]
    assert "served by other nodes now" in log, log[-2000:]  # handed over before it stopped its worker
    after = via.cluster()
    assert holders(after, MODEL) and holder not in holders(after, MODEL)
    assert not loop.replicas[-1].startswith(f"{holder}/")
    wait_for(lambda: holder not in alive(via.cluster()), 10, "peers know the node left")


def test_sigterm_on_the_coordinator_hands_over_too(trio):
    rest = [k for k, n in trio.items() if n.proc.poll() is None]
    assert len(rest) == 2
    view = trio[rest[0]].cluster()
    leader = view["leader"]
    assert leader in rest, view["leader"]
    other = next(k for k in rest if k != leader)
    loop, stream, rc = leave_under_load(trio[leader], trio[other])
    assert rc == 0, trio[leader].log()[-2000:]
    assert stream.error is None and stream.finish in ("stop", "length"), (stream.error, stream.finish)
    assert loop.failed == [], loop.failed[:3]
    last = trio[other]
    assert holders(last.cluster(), MODEL) == {other}
    # The last node leads alone at once (the leaver said goodbye; no removal timeout to wait out).
    wait_for(lambda: last.cluster()["leader"] == other, 10, "survivor leads")


def test_lone_node_just_drains(tmp_path, gemma_path):
    n = start_node(tmp_path, "--model", f"{MODEL}={gemma_path}:512", "--simulate-gpu", "solo:2000", name="solo")
    try:
        n.wait_healthy()
        n.wait_model(MODEL)
        stream = Stream(n)
        assert stream.first.wait(60)
        rc = sigterm_and_wait(n)
        stream.join()
        assert rc == 0
        assert stream.error is None and stream.finish in ("stop", "length"), (stream.error, stream.finish)
        assert "no live peer can take alpha; draining requests only" in n.log()
    finally:
        n.kill_group()


def test_a_starting_node_reports_no_cluster_facts_rather_than_term_0(tmp_path):
    """Between listening and loading its cluster state, a (re)started node must not show a term-0 view."""
    from aivailable.config import load_settings
    from aivailable.errors import NodeStarting
    from aivailable.node import Node

    settings = load_settings(None, {"state_dir": str(tmp_path), "simulate_gpus": ["s:1000"], "mdns": False}, [])
    node = Node(settings)
    try:
        with pytest.raises(NodeStarting) as e:
            node.cluster_view()
        assert e.value.http_status == 503 and e.value.retry_after == 1
    finally:
        node.cache.close()

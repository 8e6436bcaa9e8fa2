"""A damaged, full or read-only state directory, with real node processes: the node either recovers
(only the disposable cache) or refuses to start with exit code 1 and a message naming the path, the
cause and what to do. It never starts as if it had never voted."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import diskcache
import pytest

from aivailable.gossip.election import HardState
from aivailable.gossip.messages import VoterSet
from aivailable.gossip.state_store import ClusterStateError, StateStore
from tests.nodeproc import NodeProc, start_node

SECRET = "state-dir-test-secret-0123456789"
ARGS = ("--cluster-secret", SECRET, "--node-id", "n0")


def refused(n: NodeProc, *needles: str) -> str:
    """Wait for the node to exit; assert exit code 1 and a clean message containing every needle."""
    try:
        rc = n.proc.wait(60)
    except subprocess.TimeoutExpired:
        n.kill_group()
        raise AssertionError(f"the node did not refuse to start:\n{n.log()[-2000:]}") from None
    out = n.log()
    assert rc == 1, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, (needle, out)
    return out


def started(n: NodeProc) -> dict:
    """The node serves; returns its /api/cluster view once it has a leader; stops it."""
    try:
        n.wait_healthy()
        deadline = time.monotonic() + 30
        while (view := n.cluster())["leader"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return view
    finally:
        n.stop()


def write_vote(state: Path, term: int) -> None:
    store = StateStore(state / "cluster")
    store.save_hard_state(HardState(term, "n0", VoterSet(voters=("n0",), term=term, index=1)))
    store.close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m"):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cache_is_moved_aside_and_the_node_serves(tmp_path, damage):
    state = tmp_path / "node-state"
    cache = diskcache.Cache(str(state / "cache"))
    for i in range(200):
        cache.set(("estimate", i), "x" * 500)
    cache.close()
    db = state / "cache" / "cache.db"
    if damage == "garbage":
        db.write_bytes(b"\x13\x37" * 4096)
    else:  # a partly written file: the tail is missing
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    view = started(start_node(tmp_path, *ARGS))
    assert view["node_id"] == "n0"
    aside = [p.name for p in state.iterdir() if p.name.startswith("cache.corrupt-")]
    assert len(aside) == 1
    log = (tmp_path / "node.log").read_text()
    assert f"the node cache {state / 'cache'} was damaged" in log and "safe to lose" in log


@pytest.mark.parametrize("damage", ["garbage", "truncated", "half a record"])
def test_damaged_vote_refuses_to_start(tmp_path, damage):
    state = tmp_path / "node-state"
    write_vote(state, 7)
    db = state / "cluster" / "cache.db"
    if damage == "garbage":
        db.write_bytes(b"\x13\x37" * 4096)
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:10000])
    else:
        with diskcache.Cache(str(state / "cluster")) as c:
            c.set("hard_state", '{"term": 7, "voted_for": "n0", "vot')
    refused(start_node(tmp_path, *ARGS), f"cannot read the cluster state in {state / 'cluster'}", "vote",
            f"mv {state / 'cluster'} {state / 'cluster'}.bad")
    assert db.exists()  # nothing was deleted or replaced


def test_persisted_term_survives_a_restart(tmp_path):
    write_vote(tmp_path / "node-state", 7)
    assert started(start_node(tmp_path, *ARGS))["term"] >= 7


def test_damaged_or_missing_node_id_refuses_to_start(tmp_path):
    state = tmp_path / "node-state"
    state.mkdir()
    (state / "node_id").write_text("\n")
    refused(start_node(tmp_path, "--cluster-secret", SECRET), f"the node id file {state / 'node_id'} is damaged",
            "--node-id")
    (state / "node_id").unlink()
    write_vote(state, 3)  # a vote cast under an id that is now lost
    refused(start_node(tmp_path, "--cluster-secret", SECRET), f"{state / 'node_id'} is missing", "--node-id")


def test_full_disk_refuses_then_recovers_when_space_is_freed(tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True, check=False)
        state = disk / "state"
        refused(start_node(tmp_path, "--state-dir", str(state), *ARGS),
                f"cannot write the state directory {state}: No space left on device", "df -h")
        (disk / "filler").unlink()
        assert started(start_node(tmp_path, "--state-dir", str(state), *ARGS))["node_id"] == "n0"


def test_read_only_state_refuses_and_keeps_the_vote(tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        state = disk / "state"
        write_vote(state, 5)
        (state / "node_id").write_text("n0\n")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        refused(start_node(tmp_path, "--state-dir", str(state), *ARGS),
                f"cannot write the state directory {state}: Read-only file system", "remount it read-write")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert started(start_node(tmp_path, "--state-dir", str(state), *ARGS))["term"] >= 5


def test_disk_full_while_leading_stops_the_cluster_side_and_keeps_the_vote(tmp_path):
    """In-process: a leader that cannot persist a placement publishes nothing and leaves the cluster;
    what it had persisted is intact once there is room again."""
    from tests.test_transport import Node, wait_for

    async def scenario(disk: Path) -> int:
        n = await Node("n0", disk / "state").start()
        try:
            await wait_for(lambda: n.t.is_leader, what="a lone node leads")
            term = n.t.term
            subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)
            with pytest.raises(ClusterStateError, match="cannot write the cluster state .*database or disk is full.*df -h"):
                n.t.publish_placement({"m": [{"node": "n0", "gpus": ["g0"]}]})
            assert n.t.failed is not None and n.t.placement() is None  # not applied, not sent
        finally:
            await n.stop()
        (disk / "filler").unlink()
        return term

    with tmpfs(tmp_path / "disk") as disk:
        term = asyncio.run(scenario(disk))
        store = StateStore(disk / "state" / "cluster")
        assert store.hard_state is not None and store.hard_state.term == term and store.hard_state.voted_for == "n0"
        store.close()

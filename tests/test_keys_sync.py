"""The cluster key set between real `KeySync` objects, each serving POST /_cluster/keys on a local aiohttp
server (plain HTTP, as with --insecure-cluster), so pushes and pulls run the production code; and the admin
API over a real KeySync: a failed save is undone, a push that did not reach a peer is reported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aivailable import maintenance
from aivailable.api.app import build_app
from aivailable.apikeys import keyset as ks
from aivailable.gossip import envelope
from aivailable.gossip.messages import KeySetSync
from aivailable.keysync import KEYS_PATH, KeySync, Peer
from tests.fakenode import FakeNode
from tests.test_api_inprocess import catalog

SECRET = b"fake-secret"
ADMIN = {"Authorization": "Bearer " + maintenance.admin_key(SECRET)}


class Net:
    """KeySync nodes on loopback; `peers_of` is what gossip would tell each (the alive others)."""

    def __init__(self, tmp: Path, ids: tuple[str, ...]):
        self.tmp, self.ids = tmp, ids
        self.syncs: dict[str, KeySync] = {}
        self.addr: dict[str, str] = {}
        self.runners: list[web.AppRunner] = []
        self.session: aiohttp.ClientSession | None = None

    def _peers_of(self, me: str):
        return lambda: [Peer(n, self.addr[n], self.syncs[n].ring.digest, {}) for n in self.ids
                        if n != me and n in self.addr]

    async def __aenter__(self) -> Net:
        self.session = aiohttp.ClientSession()
        for n in self.ids:
            (self.tmp / n).mkdir()
            sync = KeySync(node_id=n, secret=SECRET, state_dir=self.tmp / n, session=lambda: self.session,
                           peers=self._peers_of(n))
            app = web.Application(client_max_size=32 << 20)
            app.router.add_post(KEYS_PATH, sync.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.addr[n] = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            self.syncs[n], self.runners = sync, [*self.runners, runner]
        return self

    async def __aexit__(self, *exc) -> None:
        for r in self.runners:
            await r.cleanup()
        await self.session.close()


def _history(s: ks.KeySet, n: int, node_id: str) -> ks.KeySet:
    """`n` keys made and revoked (CI jobs, a course's students): tombstones that stay in the set."""
    now = time.time()
    for i in range(n):
        s, _ = ks.add(s, name=f"ci-job-{i}", now=now, node_id=node_id)
        s = ks.revoke(s, f"ci-job-{i}", now=now, node_id=node_id)
    return s


def test_the_history_used_below_is_past_one_gossip_envelope():
    s = _history(ks.KeySet(), 1000, "n1")
    data = envelope.seal(KeySetSync(records=s.to_list()), SECRET, "n1", time.time(), b"0" * 12)
    assert len(data) > envelope.MAX_BYTES  # so the tests below would fail with the gossip envelope's limit


def test_a_revoke_still_replicates_after_a_thousand_revoked_keys(tmp_path):
    async def main():
        async with Net(tmp_path, ("n1", "n2")) as net:
            n1, n2 = net.syncs["n1"], net.syncs["n2"]
            text = n1.ring.add(name="alice", now=time.time())
            assert await n1.changed() == []
            assert n2.ring.verify(text, time.time())[0] is ks.Verdict.OK
            n1.ring.merge(_history(n1.ring.keyset, 1000, "n1"))
            assert await n1.changed() == []
            assert n2.ring.digest == n1.ring.digest
            n1.ring.revoke("alice", now=time.time())
            assert await n1.changed() == []
            assert n2.ring.verify(text, time.time())[0] is ks.Verdict.REVOKED
    asyncio.run(main())


def test_a_new_node_fails_closed_until_it_has_pulled_a_big_set(tmp_path):
    async def main():
        async with Net(tmp_path, ("n1", "n3")) as net:
            n1, n3 = net.syncs["n1"], net.syncs["n3"]
            text = n1.ring.add(name="alice", now=time.time())
            n1.ring.merge(_history(n1.ring.keyset, 1000, "n1"))
            peers = n3.refresh()  # what gossip tells n3 of n1 (its digest), before any exchange
            assert not n3.ring.keyset.records and n3.ring.protecting()  # not open in the meantime
            for p in peers:
                await n3._exchange(p)
            assert n3.ring.digest == n1.ring.digest and n3.ring.protecting()
            assert n3.ring.verify(text, time.time())[0] is ks.Verdict.OK
    asyncio.run(main())


class SyncedNode(FakeNode):
    """The real app over a FakeNode whose key ring and `keys_changed` are a real KeySync's."""

    def __init__(self, sync: KeySync):
        super().__init__(catalog())
        self.sync, self.keyring = sync, sync.ring

    async def keys_changed(self) -> list[str]:
        return await self.sync.changed()


async def _serve(node: FakeNode, body) -> None:
    async with TestClient(TestServer(build_app(node))) as c:
        await body(c)


def test_a_failed_save_leaves_no_key_behind(tmp_path):
    sync = KeySync(node_id="n0", secret=SECRET, state_dir=tmp_path, session=lambda: None, peers=lambda: [])
    (tmp_path / "api_keys.json.tmp").mkdir()  # the save fails as with a full disk or a read-only state dir

    async def body(c: TestClient) -> None:
        r = await c.post("/admin/keys", json={"name": "first"}, headers=ADMIN)
        assert r.status == 500 and "key" not in await r.json()
        assert "api key set" in (await r.json())["error"]["message"].lower()
        assert (await c.get("/v1/models")).status == 200  # still open: the unsaved first key is not live

    asyncio.run(_serve(SyncedNode(sync), body))
    assert not sync.ring.keyset.records


def test_add_and_revoke_say_which_nodes_they_did_not_reach(tmp_path, capsys):
    async def main():
        async with aiohttp.ClientSession() as session:
            unreachable = Peer("n2", "127.0.0.1:9", "f" * 16, {})  # alive in gossip, nothing listens
            sync = KeySync(node_id="n0", secret=SECRET, state_dir=tmp_path, session=lambda: session,
                           peers=lambda: [unreachable])
            got = {}

            async def body(c: TestClient) -> None:
                got["add"] = await (await c.post("/admin/keys", json={"name": "alice"}, headers=ADMIN)).json()
                got["revoke"] = await (await c.delete("/admin/keys/alice", headers=ADMIN)).json()

            await _serve(SyncedNode(sync), body)
            return got
    got = asyncio.run(main())
    assert got["add"]["not_yet_on"] == ["n2"] and got["add"]["key"].startswith("aiv-")
    assert got["revoke"]["revoked"] is True and got["revoke"]["not_yet_on"] == ["n2"]

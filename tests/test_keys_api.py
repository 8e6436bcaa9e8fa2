"""Cluster-wide API keys at the HTTP surface, in-process: the real `build_app` over a `FakeNode` whose key
ring is the real one (aivailable/apikeys/ring.py). Admin API, enforcement on /v1, allow-lists, viewer keys,
the cluster-wide rate limit's refusal, protect_status, and the rejection metric."""

from __future__ import annotations

import time

from aiohttp.test_utils import TestClient

from aivailable import maintenance
from aivailable.api import hop
from aivailable.apikeys import keyset as ks
from tests.fakenode import FakeNode
from tests.test_api_inprocess import CHAT, MODEL, catalog, error_of, run

SECRET = b"fake-secret"
ADMIN = {"Authorization": "Bearer " + maintenance.admin_key(SECRET)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def rejections(text: str) -> dict[str, float]:
    return {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("aivailable_api_key_rejections_total{")}


def test_admin_api_adds_lists_and_revokes_keys_and_checks_its_input():
    async def body(c: TestClient) -> None:
        assert (await c.get("/v1/models")).status == 200  # no key anywhere: open, as before
        assert (await c.post("/admin/keys", json={"name": "a"})).status == 401
        r = await c.post("/admin/keys", json={"name": "alice", "models": [], "rpm": 0}, headers=ADMIN)
        assert r.status == 200, await r.text()
        made = await r.json()
        key = made["key"]
        assert key.startswith("aiv-") and made["fingerprint"] in key and "only now" in made["note"]
        assert (await c.post("/admin/keys", json={"name": "b"}, headers=bearer(key))).status == 403  # user key
        r = await c.post("/admin/keys", json={"name": "alice"}, headers=ADMIN)
        assert r.status == 409 and (await error_of(r))["param"] == "name"
        for bad, param in [({"name": "x", "rpm": "5"}, "rpm"), ({"name": "x", "nope": 1}, "nope"),
                           ({"rpm": 1}, "name"), ({"name": "x", "expires": time.time() - 5}, "expires"),
                           ({"name": "x", "kind": "root"}, "kind"), ({"name": "x", "models": "m"}, "models")]:
            r = await c.post("/admin/keys", json=bad, headers=ADMIN)
            assert r.status == 400, bad
            assert (await error_of(r))["param"] == param
        r = await c.get("/admin/keys", headers=ADMIN)
        listed = await r.json()
        text = await r.text()
        assert [k["name"] for k in listed["keys"]] == ["alice"] and listed["keys"][0]["state"] == "active"
        assert key.split("-")[2] not in text and "hash" not in listed["keys"][0] and "salt" not in text
        assert (await c.delete("/admin/keys/nobody", headers=ADMIN)).status == 404
        assert (await c.post("/admin/keys", json={"name": "bob"}, headers=ADMIN)).status == 200
        assert (await c.delete("/admin/keys/alice", headers=ADMIN)).status == 200
        r = await c.get("/v1/models", headers=bearer(key))
        assert r.status == 401 and "revoked" in (await error_of(r))["message"]
        assert (await c.delete("/admin/keys/bob", headers=ADMIN)).status == 200
        assert (await c.get("/v1/models")).status == 200  # no key left that is not revoked: open again

    node = FakeNode(catalog())
    run(node, body)
    assert node.key_changes == 4  # adds and revokes each persisted and pushed


def test_v1_enforcement_allow_list_viewer_expiry_and_config_keys():
    # insecure_cluster: in-process there is no TLS cluster port, and the forwarded request below comes as a peer's
    node = FakeNode(catalog(other={"name": "other"}), api_keys=["sk-cfg-1"], load_wait_s=0, insecure_cluster=True)
    now = time.time()
    user = node.keyring.add(name="team-a", models=["tiny"], now=now)
    viewer = node.keyring.add(name="grafana", kind="viewer", now=now)
    soon = node.keyring.add(name="temp", expires=now + 1.0, now=now)

    async def body(c: TestClient) -> None:
        assert (await c.get("/v1/models", headers=bearer(soon))).status == 200
        r = await c.get("/v1/models")
        assert r.status == 401 and "Missing API key" in (await error_of(r))["message"]
        r = await c.get("/v1/models", headers=bearer("aiv-0123456789abcdef-" + "x" * 43))
        assert r.status == 401 and (await error_of(r))["code"] == "invalid_api_key"
        r = await c.get("/v1/models", headers=bearer(user))
        assert r.status == 200 and [m["id"] for m in (await r.json())["data"]] == ["tiny"]  # only what it may use
        r = await c.get("/v1/models", headers=bearer("sk-cfg-1"))  # config keys: every model, as before
        assert sorted(m["id"] for m in (await r.json())["data"]) == ["other", "tiny"]
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "other"}, headers=bearer(user))
        err = await error_of(r)
        assert r.status == 403 and err["code"] == "model_not_allowed" and err["param"] == "model"
        assert "'other'" in err["message"] and "'team-a'" in err["message"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers=bearer(user))
        assert r.status == 503  # allowed: on to routing (FakeNode has no replica)
        r = await c.get("/v1/models", headers=bearer(viewer))
        assert r.status == 403 and (await error_of(r))["code"] == "viewer_key"
        time.sleep(max(0.0, now + 1.0 - time.time()))
        r = await c.get("/v1/models", headers=bearer(soon))
        assert r.status == 401 and "'temp' expired at" in (await error_of(r))["message"]
        # Forwarded by a peer (signed hop with a count): the entry node checked it, whatever this set says.
        fwd = {**bearer("aiv-0123456789abcdef-" + "y" * 43), hop.HEADER: hop.sign(SECRET, "n2", "/v1/chat/completions",
                                                                                   time.time()), hop.COUNT_HEADER: "1"}
        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "other"}, headers=fwd)).status == 503
        counted = rejections(await (await c.get("/metrics")).text())
        assert counted == {"missing": 1, "unknown": 1, "model_not_allowed": 1, "viewer": 1, "expired": 1}

    run(node, body)


def test_cluster_wide_rpm_counts_other_nodes_reports():
    node = FakeNode(catalog())
    key = node.keyring.add(name="lim", rpm=3, now=time.time())

    async def body(c: TestClient) -> None:
        assert (await c.get("/v1/models", headers=bearer(key))).status == 200
        node.keyring.set_peers({"n2": (node.keyring.digest, {"lim": 1})})
        assert (await c.get("/v1/models", headers=bearer(key))).status == 200
        r = await c.get("/v1/models", headers=bearer(key))  # 2 here + 1 on n2 = 3
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert "3 requests per minute across the cluster" in (await error_of(r))["message"]
        node.keyring.set_peers({})  # n2 gone
        assert (await c.get("/v1/models", headers=bearer(key))).status == 200

    run(node, body)
    assert sum(node.rate_limited.values()) == 1


def test_protect_status_needs_any_key_and_health_stays_open():
    node = FakeNode(catalog(), protect_status=True)
    viewer = node.keyring.add(name="grafana", kind="viewer", now=time.time())
    user = node.keyring.add(name="u", now=time.time())

    async def body(c: TestClient) -> None:
        assert (await c.get("/health")).status == 200
        for path in ("/api/cluster", "/metrics", "/api/history"):
            r = await c.get(path)
            assert r.status == 401 and (await error_of(r))["code"] == "invalid_api_key", path
            for key in (viewer, user):
                assert (await c.get(path, headers=bearer(key))).status == 200, path
        r = await c.get("/")
        assert r.status == 401 and "protects its status page" in await r.text()
        assert (await c.get("/", headers=bearer(viewer))).status == 200
        assert (await c.get("/api/cluster", headers=ADMIN)).status == 200
        assert (await c.get("/api/cluster", headers=bearer("aiv-0123456789abcdef-" + "z" * 43))).status == 401
        assert (await c.get("/v1/models", headers=bearer(viewer))).status == 403

    run(node, body)


def test_a_node_that_has_not_pulled_its_peers_key_set_yet_fails_closed():
    """Just joined, or restarted without api_keys.json: its own set is empty, gossip says the peers hold
    another (non-empty) one, so /v1 needs a key until the pull lands (it would also forward unchecked)."""
    peers_set, _ = ks.add(ks.KeySet(), name="alice", now=time.time(), node_id="n1")
    node = FakeNode(catalog())
    node.keyring.set_peers({"n1": (ks.digest(peers_set), {}), "n2": (ks.digest(ks.KeySet()), {})})

    async def body(c: TestClient) -> None:
        assert (await c.get("/v1/models")).status == 401
        assert (await c.post("/v1/chat/completions", json=CHAT)).status == 401
        node.keyring.set_peers({"n2": (ks.digest(ks.KeySet()), {})})  # only open peers: open, as before
        assert (await c.get("/v1/models")).status == 200

    run(node, body)


def test_expires_out_of_range_is_a_400_naming_it():
    async def body(c: TestClient) -> None:
        for i, literal in enumerate([b"1" + b"0" * 400, b"NaN", b"1e999", b"Infinity", b"-1", b"253402300800"]):
            raw = b'{"name": "k%d", "expires": %s}' % (i, literal)
            r = await c.post("/admin/keys", data=raw, headers={**ADMIN, "Content-Type": "application/json"})
            assert r.status == 400, (literal, await r.text())
            assert (await error_of(r))["param"] == "expires"

    node = FakeNode(catalog())
    run(node, body)
    assert not node.keyring.keyset.records


def test_the_model_card_respects_the_allow_list():
    node = FakeNode(catalog(other={"name": "other"}))
    key = node.keyring.add(name="team-a", models=[MODEL], now=time.time())

    async def body(c: TestClient) -> None:
        assert (await c.get(f"/v1/models/{MODEL}", headers=bearer(key))).status == 200
        r = await c.get("/v1/models/other", headers=bearer(key))
        assert r.status == 403 and "other" in (await error_of(r))["message"]

    run(node, body)


class RacingAdd(FakeNode):
    """While this node pushes its new key "ci", another node's admin adds "ci" too, with a later stamp."""

    async def keys_changed(self) -> list[str]:
        other, _ = ks.add(ks.KeySet(), name="ci", now=time.time() + 0.05, node_id="n9")
        self.keyring.merge(other)
        return []


def test_an_add_that_loses_a_concurrent_add_of_its_name_answers_409_not_a_dead_key():
    async def body(c: TestClient) -> None:
        r = await c.post("/admin/keys", json={"name": "ci"}, headers=ADMIN)
        assert r.status == 409
        err = await error_of(r)
        assert err["param"] == "name" and "another node" in err["message"]

    run(RacingAdd(catalog()), body)

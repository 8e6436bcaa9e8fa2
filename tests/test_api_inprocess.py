"""What the API's handlers decide, in-process: the real `build_app` over a `FakeNode` (tests/fakenode.py),
served on a loopback socket by aiohttp's test server. No node or worker process runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aivailable import maintenance
from aivailable.api.app import build_app
from aivailable.api.port import NodePort
from aivailable.api.ratelimit import fingerprint
from aivailable.api.router import Upstream
from aivailable.node_api import NodeApi
from tests.fakenode import FakeNode

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                           "finish_reason": "stop"}]}


def run(node: FakeNode, body: Callable[[TestClient], Awaitable[None]]) -> None:
    """Serve `build_app(node)` on a loopback port and run `body` with a client of it."""

    async def main() -> None:
        async with TestClient(TestServer(build_app(node))) as client:
            await body(client)

    asyncio.run(main())


def catalog(**extra: dict) -> dict[str, dict]:
    return {MODEL: {"name": MODEL, "ctx": 4096, "parallel": 2}, **extra}


async def error_of(r: aiohttp.ClientResponse) -> dict:
    body = await r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_node_api_and_the_fake_have_every_member_of_the_port():
    members = {n for n in vars(NodePort) if not n.startswith("_")} | set(NodePort.__annotations__)
    assert {"config", "models", "upstreams", "raise_unavailable", "begin_request", "record_rate_limited"} <= members
    fake = FakeNode()
    assert sorted(m for m in members if not hasattr(fake, m)) == []
    assert sorted(m for m in members if not hasattr(NodeApi, m)) == []


def test_unknown_model_is_404_naming_it_and_the_known_ones():
    async def body(c: TestClient) -> None:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status == 404
        err = await error_of(r)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "'nope'" in err["message"] and MODEL in err["message"]
        r = await c.get("/v1/models/nope")
        assert r.status == 404 and "'nope'" in (await error_of(r))["message"]

    node = FakeNode(catalog())
    run(node, body)
    assert node.began == []  # an unknown model is no demand


def test_unavailable_model_without_load_wait_is_503_at_once_with_retry_after_and_reason():
    async def body(c: TestClient) -> None:
        t0 = asyncio.get_running_loop().time()
        r = await c.post("/v1/chat/completions", json={**CHAT, "keep_alive": "5m"})
        assert asyncio.get_running_loop().time() - t0 < 1.0
        assert r.status == 503 and r.headers["Retry-After"] == "7"
        err = await error_of(r)
        assert err["code"] == "model_not_ready"
        assert "loading" in err["message"] and "worker starting on g0" in err["message"]

    node = FakeNode(catalog(), states={MODEL: ("loading", "worker starting on g0")}, load_wait_s=0)
    run(node, body)
    assert node.began == [(MODEL, 300.0)] and node.ended == [MODEL]  # counted as demand, then ended
    assert "aivailable_load_wait_seconds_count" not in node.metrics.render()[0].decode()  # it never queued


def test_loading_model_waits_at_most_load_wait_s_then_503_with_the_reason():
    async def body(c: TestClient) -> None:
        t0 = asyncio.get_running_loop().time()
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert asyncio.get_running_loop().time() - t0 >= 0.5
        assert r.status == 503 and r.headers["Retry-After"] == "7"
        assert "worker starting on g0" in (await error_of(r))["message"]

    node = FakeNode(catalog(), states={MODEL: ("loading", "worker starting on g0")}, load_wait_s=0.5)
    run(node, body)
    assert 'aivailable_load_wait_seconds_count{model="tiny"} 1.0' in node.metrics.render()[0].decode()
    assert node.ended == [MODEL]


def test_loading_model_waits_then_is_served_by_the_replica_that_became_ready():
    async def replica(request: web.Request) -> web.Response:
        seen.append(json.loads(await request.read()))
        return web.json_response(COMPLETION)

    seen: list[dict] = []
    node = FakeNode(catalog(), states={MODEL: ("loading", "worker starting")}, load_wait_s=10)

    async def body(c: TestClient) -> None:
        upstream_app = web.Application()
        upstream_app.router.add_post("/v1/chat/completions", replica)
        async with TestServer(upstream_app) as server, aiohttp.ClientSession() as session:
            up = Upstream("n0/tiny@g0", MODEL, lambda: session, str(server.make_url("")).rstrip("/"), True)

            async def becomes_ready() -> None:
                await asyncio.sleep(0.4)
                node.states[MODEL] = ("ready", "")
                node.ready[MODEL] = [up]

            task = asyncio.create_task(becomes_ready())
            r = await c.post("/v1/chat/completions", json={**CHAT, "keep_alive": 60})
            await task
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"] == "hello"
            assert r.headers["X-AIvailable-Replica"] == "n0/tiny@g0"

    run(node, body)
    assert len(seen) == 1 and seen[0]["messages"] == CHAT["messages"] and "keep_alive" not in seen[0]
    text = node.metrics.render()[0].decode()
    assert 'aivailable_requests_total{endpoint="chat",model="tiny",status="200"} 1.0' in text
    assert "aivailable_load_wait_seconds_count" in text


def test_api_keys_are_required_when_set():
    async def body(c: TestClient) -> None:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status == 401 and "Missing API key" in (await error_of(r))["message"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"})
        assert r.status == 401 and (await error_of(r))["code"] == "invalid_api_key"
        r = await c.get("/v1/models", headers={"Authorization": "Basic sk-good"})
        assert r.status == 401
        r = await c.get("/v1/models", headers={"Authorization": "Bearer sk-good"})
        assert r.status == 200
        assert (await c.get("/health")).status == 200  # only /v1/* needs a key

    run(FakeNode(catalog(), api_keys=["sk-good"]), body)


def test_without_keys_the_api_is_open():
    async def body(c: TestClient) -> None:
        assert (await c.get("/v1/models")).status == 200

    run(FakeNode(catalog()), body)


def test_rate_limit_is_429_with_retry_after_and_recorded_through_the_port():
    async def body(c: TestClient) -> None:
        auth = {"Authorization": "Bearer sk-good"}
        assert (await c.get("/v1/models", headers=auth)).status == 200
        r = await c.get("/v1/models", headers=auth)
        assert r.status == 429 and float(r.headers["Retry-After"]) > 0
        err = await error_of(r)
        assert err["code"] == "rate_limit_exceeded" and fp in err["message"] and "sk-good" not in err["message"]
        metrics = await (await c.get("/metrics")).text()
        assert f'aivailable_rate_limited_total{{key="{fp}"}} 1.0' in metrics

    node = FakeNode(catalog(), api_keys=["sk-good"], rate_limit_rpm=1, secret=b"s3cret")
    fp = fingerprint("sk-good", b"s3cret")
    run(node, body)
    assert node.rate_limited == {fp: 1}


def test_bad_json_and_bad_fields_are_400_naming_them():
    async def body(c: TestClient) -> None:
        r = await c.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status == 400 and (await error_of(r))["type"] == "invalid_request_error"
        r = await c.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"})
        assert r.status == 400 and (await error_of(r))["param"] == "temperature"
        r = await c.post("/v1/chat/completions", json={"model": MODEL})
        assert r.status == 400 and (await error_of(r))["param"] == "messages"
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "embed"})
        err = await error_of(r)
        assert r.status == 400 and err["param"] == "model" and "/v1/embeddings" in err["message"]

    node = FakeNode(catalog(embed={"name": "embed", "embedding": True}))
    run(node, body)
    assert node.began == []


def test_models_lists_the_catalog_with_per_request_context_and_state():
    async def body(c: TestClient) -> None:
        r = await c.get("/v1/models")
        assert r.status == 200
        data = {m["id"]: m for m in (await r.json())["data"]}
        assert sorted(data) == ["big", MODEL]
        assert data[MODEL]["context_length"] == 2048 and data[MODEL]["context_length_total"] == 4096
        assert data[MODEL]["state"] == "ready" and data[MODEL]["created"] == 1_700_000_000
        assert data["big"]["context_length"] is None and data["big"]["state"] == "unplaced"
        r = await c.get(f"/v1/models/{MODEL}")
        assert r.status == 200 and (await r.json())["id"] == MODEL

    run(FakeNode(catalog(big={"name": "big"}), states={MODEL: ("ready", "")}), body)


def test_health_says_ok_with_ready_models_or_starting_with_503():
    up = Upstream("n0/tiny@g0", MODEL, lambda: None, "http://worker", True)

    async def ok(c: TestClient) -> None:
        r = await c.get("/health")
        assert r.status == 200
        assert await r.json() == {"status": "ok", "node_id": "n7", "uptime_s": 12.3, "models_ready": [MODEL]}

    run(FakeNode(catalog(), ready={MODEL: [up]}, node_id="n7"), ok)

    async def starting(c: TestClient) -> None:
        r = await c.get("/health")
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert await r.json() == {"status": "starting", "node_id": "n7"}
        r = await c.get("/api/cluster")
        assert r.status == 503 and (await error_of(r))["code"] == "node_starting"

    node = FakeNode(catalog(), node_id="n7")
    node.is_starting = True
    run(node, starting)


def test_cluster_view_is_the_ports():
    async def body(c: TestClient) -> None:
        r = await c.get("/api/cluster")
        assert r.status == 200
        assert await r.json() == {"node_id": "n0", "models": [
            {"name": MODEL, "state": "failed", "reason": "out of memory", "replicas": []}]}

    run(FakeNode(catalog(), states={MODEL: ("failed", "out of memory")}), body)


def test_drain_needs_the_admin_key_and_goes_through_the_port():
    node = FakeNode(catalog(), api_keys=["sk-good"], secret=b"s3cret")
    admin = maintenance.admin_key(b"s3cret")

    async def body(c: TestClient) -> None:
        r = await c.post("/admin/drain", json={"gpu": "0"}, headers={"Authorization": "Bearer sk-good"})
        assert r.status == 403
        r = await c.post("/admin/drain", json={"gpu": 0}, headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 200 and (await r.json())["node"] == "n0"
        r = await c.post("/admin/undrain", headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 200 and (await r.json())["drained"] is False
        r = await c.post("/admin/drain", json={"disk": 1}, headers={"Authorization": f"Bearer {admin}"})
        assert r.status == 400 and (await error_of(r))["param"] == "disk"

    run(node, body)
    assert node.drains == [("0", True), (None, False)]


def test_cluster_routes_reach_the_port():
    async def body(c: TestClient) -> None:
        assert (await c.post("/_cluster/gossip", data=b"x")).status == 204
        assert (await c.post("/_cluster/files", data=b"x")).status == 404

    run(FakeNode(insecure_cluster=True), body)  # plaintext cluster traffic: taken only with --insecure-cluster

    async def refused(c: TestClient) -> None:
        assert (await c.post("/_cluster/gossip", data=b"x")).status == 421

    node = FakeNode()
    run(node, refused)  # with cluster TLS (the default), only over TLS on the cluster port
    assert node.cluster_refusals == [("127.0.0.1", "plaintext")]

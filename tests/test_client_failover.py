"""aivailable.client: the official openai client given every node survives kill -9 of the node it is
connected to, mid-stream; plus the node-order rules on their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import openai
import pytest

from aivailable.client import FailoverTransport, Nodes, async_openai_client, httpx, openai_client
from tests.nodeproc import NodeProc, free_port, start_cluster

MODEL = "gemma-3-270m"
SECRET = "test-cluster-secret-0123456789abcdef"
PROMPT = "Here is a long story about a dragon who lived in a cave by the sea. Once upon a time"


# ---- node order (pure) ----------------------------------------------------------------------------------


def test_plan_starts_at_the_url_node_rotates_with_retries_and_puts_failed_nodes_last():
    nodes = Nodes.parse(["a:1", "http://b:2", "c:3"])
    url = httpx.URL("http://b:2/v1/chat/completions")
    assert nodes.plan(url, 0, now=0.0) == [1, 2, 0]
    assert nodes.plan(url, 1, now=0.0) == [2, 0, 1]  # the openai client's first retry: the next node
    nodes.failed(2, now=0.0)
    assert nodes.plan(url, 0, now=1.0) == [1, 0, 2]
    assert nodes.plan(url, 0, now=5.1) == [1, 2, 0]  # avoided for avoid_s only
    nodes.failed(2, now=6.0)
    nodes.ok(2)
    assert nodes.plan(url, 0, now=6.1) == [1, 2, 0]
    assert nodes.plan(httpx.URL("http://d:4/v1/models"), 0, now=7.0) == [3, 0, 1, 2]  # the URL's node joins


def test_retarget_moves_the_request_and_its_host_header():
    nodes = Nodes.parse(["127.0.0.1:8000", "127.0.0.2:9000"])
    req = httpx.Request("POST", "http://127.0.0.1:8000/v1/completions", content=b'{"a":1}',
                        headers={"Authorization": "Bearer k"})
    moved = nodes.retarget(req, 1)
    assert str(moved.url) == "http://127.0.0.2:9000/v1/completions"
    assert moved.headers["Host"] == "127.0.0.2:9000" and moved.headers["Authorization"] == "Bearer k"
    assert moved.content == b'{"a":1}' and moved.headers["Content-Length"] == "7"


@pytest.mark.parametrize("bad", ["", "ftp://x:1", "http://:80"])
def test_bad_node_addresses_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="node address|at least one"):
        Nodes.parse([bad] if bad else [])


def test_every_node_down_gives_the_connection_error_after_trying_each(tmp_path):
    ports = [free_port("127.0.0.1") for _ in range(2)]
    t = FailoverTransport([f"127.0.0.1:{p}" for p in ports])
    client = openai.OpenAI(base_url=t.nodes.base_url(), api_key="x", max_retries=0, timeout=5,
                           http_client=openai.DefaultHttpxClient(transport=t))
    t0 = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    assert time.monotonic() - t0 < 5
    assert t.nodes.stats["failovers"] == 2 and set(t.nodes.down_until) == {0, 1}  # both tried, both avoided


# ---- a real cluster, kill -9 of the entry node --------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gemma_path):
    """Three nodes, the model on each (so any survivor can continue a stream)."""
    tmp = tmp_path_factory.mktemp("failover")
    cfg = tmp / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 1024\n'
                   "min_replicas = 3\nmax_replicas = 3\n")
    nodes = start_cluster(tmp, cfg, SECRET)
    try:
        yield nodes
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.kill_group()


def addrs(nodes: list[NodeProc]) -> list[str]:
    return [f"{n.host}:{n.port}" for n in nodes]


def test_completion_stream_survives_kill_9_of_the_node_it_is_connected_to(cluster):
    n1 = cluster[0]
    client = openai_client(addrs(cluster), api_key="x", max_retries=0, timeout=60)
    assert client.base_url.host == n1.host
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    whole = client.completions.create(**args).choices[0]
    pieces, finish, usage, killed_after = [], None, None, None
    for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
        if killed_after is None and len(pieces) >= 6:
            killed_after = "".join(pieces)
            n1.kill_group()  # the node this client's connection is on, and its workers
    assert killed_after is not None, "the stream ended before the kill"
    text = "".join(pieces)
    assert len(text) > len(killed_after)
    assert text == whole.text and finish == whole.finish_reason  # greedy: continued exactly
    assert usage is not None and usage.completion_tokens >= 30
    # The dead node is avoided: the next request (no openai retries) goes straight to a survivor.
    t0 = time.monotonic()
    again = client.completions.create(**args)
    assert again.choices[0].text == whole.text and time.monotonic() - t0 < 30


def test_async_chat_stream_survives_kill_9_of_the_node_it_is_connected_to(cluster):
    n2 = cluster[1]
    client = async_openai_client(addrs(cluster[1:]), api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Tell me a long story about a dragon."}]

    async def run():
        whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                      stream=True)
        pieces, roles, ids, finish, killed = [], 0, set(), None, False
        async for chunk in stream:
            ids.add(chunk.id)
            for c in chunk.choices:
                roles += bool(c.delta.role)
                if c.delta.content:
                    pieces.append(c.delta.content)
                finish = c.finish_reason or finish
            if not killed and len(pieces) >= 6:
                killed = True
                n2.kill_group()
        await client.close()
        return whole.choices[0], pieces, roles, ids, finish, killed

    whole, pieces, roles, ids, finish, killed = asyncio.run(run())
    assert killed, "the stream ended before the kill"
    assert len(pieces) > 6 and finish == whole.finish_reason
    assert roles == 1 and len(ids) == 1  # one stream to the application: one opening chunk, one id
    assert "".join(pieces) == whole.message.content


def test_a_stream_no_node_can_continue_ends_with_an_openai_error_not_a_dropped_connection(cluster):
    n3 = cluster[2]
    client = openai_client(addrs([n3]), api_key="x", max_retries=0, timeout=60)
    pieces = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                               stream=True):
            pieces += [c.text for c in chunk.choices]
            if len(pieces) == 6:
                n3.kill_group()
    assert not isinstance(err.value, openai.APIConnectionError)
    assert "no other node could continue it" in err.value.message
    assert len(pieces) >= 6


# ---- the stream logic over an in-process transport (what no live cluster produces on demand) ------------


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o, separators=(",", ":")).encode())
                    + b"\n\n" for o in objs)


def _chunk(text: str, finish=None, id_="cmpl-1") -> dict:
    return {"id": id_, "object": "text_completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


class _Breaks(httpx.SyncByteStream):
    """Yields ``data`` then fails like a connection that drops."""

    def __init__(self, data: bytes):
        self.data = data

    def __iter__(self):
        yield self.data
        raise httpx.ReadError("connection reset")


def _transport(answers: dict[str, list]):
    """Node host -> answers in turn; records every request as (host, json body)."""
    seen: list[tuple[str, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, json.loads(request.content)))
        answer = answers[request.url.host].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=answer if isinstance(answer, httpx.SyncByteStream) else httpx.ByteStream(answer))

    return FailoverTransport(["a:1", "b:2"], transport=httpx.MockTransport(handler)), seen


def _read(transport, body: dict) -> list[dict]:
    with httpx.Client(transport=transport) as c, c.stream("POST", "http://a:1/v1/completions", json=body) as r:
        raw = b"".join(r.iter_bytes())
    return [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


def test_an_upstream_failed_end_is_held_back_and_the_stream_continued_on_the_next_node():
    failed = {"error": {"message": "x", "type": "server_error", "param": None, "code": "upstream_failed"}}
    t, seen = _transport({"a": [_sse(_chunk("Once"), _chunk(" upon"), failed)],
                          "b": [_sse(_chunk(" a", id_="cmpl-2"), _chunk(" time", "length", "cmpl-2"), b"[DONE]")]})
    events = _read(t, {"model": MODEL, "prompt": "Tell:", "max_tokens": 4, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == "Once upon a time"
    assert {e["id"] for e in events} == {"cmpl-1"} and all("error" not in e for e in events)
    assert [h for h, _ in seen] == ["a", "b"]
    assert seen[1][1]["prompt"] == "Tell:Once upon" and seen[1][1]["max_tokens"] == 2
    assert t.nodes.stats == {"failovers": 0, "streams_continued": 1, "streams_given_up": 0}


def test_a_dropped_chat_stream_continues_as_the_final_assistant_message_and_keeps_one_opening_chunk():
    def chat(delta, finish=None, id_="chat-1"):
        return {"id": id_, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    t, seen = _transport({"a": [_Breaks(_sse(chat({"role": "assistant", "content": ""}), chat({"content": "Hi"})))],
                          "b": [_sse(chat({"role": "assistant", "content": ""}, id_="chat-2"),
                                     chat({"content": " there"}, "stop", "chat-2"), b"[DONE]")]})
    with httpx.Client(transport=t) as c, c.stream("POST", "http://a:1/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "stream": True}) as r:
        raw = b"".join(r.iter_bytes())
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert sum(bool(e["choices"][0]["delta"].get("role")) for e in events) == 1
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "Hi there"
    assert raw.endswith(b"data: [DONE]\n\n")
    body = seen[1][1]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hi"} and body["continue_final_message"] is True
    assert t.nodes.down_until  # the node whose connection dropped is tried last for a while


def test_a_node_that_refuses_the_connection_is_skipped_before_any_byte():
    t, seen = _transport({"a": [httpx.ConnectError("refused")],
                          "b": [_sse(_chunk("ok", "stop"), b"[DONE]")]})
    events = _read(t, {"model": MODEL, "prompt": "x", "stream": True})
    assert [e["choices"][0]["text"] for e in events] == ["ok"] and [h for h, _ in seen] == ["a", "b"]
    assert t.nodes.stats["failovers"] == 1

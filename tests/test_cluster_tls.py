"""TLS between real node processes: what crosses the network between two nodes is encrypted, and a node
with another cluster secret cannot talk to the cluster (each refusal counted on both sides).

The capture: node n2 listens on 127.0.0.22 but advertises 127.0.0.2, where a relay copies every byte
in both directions to and from it (its API port and its cluster port). The client asks n1, whose GPU is
too small for the model, so every request is forwarded to n2 through the relay. With --insecure-cluster
the same setup shows the prompt in the capture (the capture works); with TLS, no prompt, answer or API key."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import openai
import pytest

from tests.nodeproc import free_port, start_node

MODEL = "gemma-3-270m"
SECRET = "tls-cluster-test-secret-0123456789"
API_KEY = "sk-lab-client-key-DO-NOT-LEAK-4242"
PROMPT = "Zanzibar-marker-7731 says hello to"


class Relay:
    """Forward 127.0.0.2:port -> 127.0.0.22:port for each port, keeping every byte seen."""

    def __init__(self, ports: list[int]):
        self.ports, self.captured = ports, bytearray()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        servers = [self.loop.run_until_complete(asyncio.start_server(
            lambda r, w, p=p: self._pipe(r, w, p), "127.0.0.2", p)) for p in self.ports]
        self.ready.set()
        self.loop.run_forever()
        for s in servers:
            s.close()

    async def _pipe(self, cr, cw, port: int) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.22", port)
        except OSError:
            cw.close()
            return

        async def copy(src, dst) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    self.captured += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(cr, uw), copy(ur, cw))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _pair(tmp, gemma_path, *extra: str):
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\n')
    p2 = free_port("127.0.0.22")
    relay = Relay([p2, p2 + 1])
    common = ["--config", str(cfg), "--cluster-secret", SECRET, "--api-key", API_KEY, *extra]
    n2 = start_node(tmp, *common, "--simulate-gpu", "g2:2048", "--node-id", "n2", "--advertise-host", "127.0.0.2",
                    host="127.0.0.22", port=p2, name="n2")
    n1 = start_node(tmp, *common, "--simulate-gpu", "g1:64", "--node-id", "n1", "--join", f"127.0.0.2:{p2}",
                    host="127.0.0.1", name="n1")
    return relay, n1, n2


def _ask(n1) -> str:
    client = openai.OpenAI(base_url=n1.api, api_key=API_KEY, max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=12, temperature=0)
            return r.choices[0].message.content or ""
        except (openai.APIStatusError, openai.APIConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _holders(n) -> set[str]:
    return {r["node"] for m in n.cluster()["models"] for r in m["replicas"] if r["state"] == "ready"}


def _served_through_relay(tmp, gemma_path, *extra: str) -> tuple[bytes, str]:
    relay, n1, n2 = _pair(tmp, gemma_path, *extra)
    try:
        n1.wait_healthy(120)
        n2.wait_healthy(120)
        deadline = time.monotonic() + 150
        while _holders(n1) != {"n2"}:
            assert time.monotonic() < deadline, n1.cluster()
            time.sleep(0.5)
        answers = [_ask(n1) for _ in range(2)]
        answer = max(answers, key=len)
        return bytes(relay.captured), answer
    finally:
        for n in (n1, n2):
            n.stop()
        relay.close()


@pytest.mark.timeout(420)
def test_nothing_readable_crosses_between_nodes_and_the_capture_would_have_seen_it(tmp_path, gemma_path):
    plain, plain_answer = _served_through_relay(tmp_path / "plain", gemma_path, "--insecure-cluster")
    assert PROMPT.encode() in plain and API_KEY.encode() in plain  # the relay sees forwarded requests
    captured, answer = _served_through_relay(tmp_path / "tls", gemma_path)
    assert len(captured) > 20_000, len(captured)  # gossip, the requests and their answers went through it
    assert b"\x16\x03" in captured[:16] or captured.count(b"\x17\x03\x03") > 10  # TLS records
    for secret_text in (PROMPT, API_KEY, SECRET, MODEL, "chat/completions", "Bearer"):
        assert secret_text.encode() not in captured, secret_text
    # The answer: greedy decoding gives the same text in both runs; its longest word is in the plaintext
    # capture (so looking for it can find it) and not in the TLS one.
    assert answer == plain_answer
    word = max(re.findall(r"[A-Za-z0-9]+", answer), key=len, default="")
    assert len(word) >= 4, answer
    assert word.encode() in plain and word.encode() not in captured, word
    assert b"HTTP/1.1" not in captured


@pytest.mark.timeout(300)
def test_a_node_with_another_secret_is_refused_in_the_handshake_on_both_sides(tmp_path, gemma_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\n')
    n1 = start_node(tmp_path, "--config", str(cfg), "--cluster-secret", SECRET, "--simulate-gpu", "g1:2048",
                    "--node-id", "n1", host="127.0.0.1", name="n1")
    stranger = None
    try:
        n1.wait_healthy(120)
        stranger = start_node(tmp_path, "--config", str(cfg), "--cluster-secret", "a-different-secret-0000000000",
                              "--simulate-gpu", "g3:2048", "--node-id", "n3", "--join", f"127.0.0.1:{n1.port}",
                              host="127.0.0.3", name="n3")
        stranger.wait_healthy(120)
        deadline = time.monotonic() + 60
        while True:
            mine = n1.cluster()["security"]["cluster_rejected"]
            theirs = stranger.cluster()["security"]["cluster_rejected"]
            if mine.get("tls_handshake", 0) >= 1 and theirs.get("tls_peer_refused", 0) >= 1:
                break
            assert time.monotonic() < deadline, (mine, theirs)
            time.sleep(0.5)
        assert [n["id"] for n in n1.cluster()["nodes"]] == ["n1"]
        assert [n["id"] for n in stranger.cluster()["nodes"]] == ["n3"]
        assert n1.cluster()["security"]["cluster_tls"]["enabled"] is True
        assert "different cluster secret" in n1.log() and "different cluster secret" in stranger.log()
    finally:
        for n in (stranger, n1):
            if n is not None:
                n.stop()

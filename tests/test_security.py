"""Security of a live node process: hostile /_cluster/ messages are refused, counted (/metrics and the
status page's JSON) and harmless; nothing private is readable without the secret; API keys are
rate-limited per key (429 + Retry-After) and no key or secret appears in any page, metric or log."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from aivailable import keysync
from aivailable.api.app import build_app
from aivailable.api.ratelimit import fingerprint
from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest, Gossip, KeySetSync
from tests import peertls
from tests.badenvelopes import bad_envelopes, seal
from tests.fakenode import FakeNode
from tests.nodeproc import get_json, serving

MODEL = "gemma-3-270m"
SECRET = "live-node-secret-0123456789abcdef"
LIMITED, FREE = "sk-limited-0123456789", "sk-unlimited-9876543210"
RPM = 3


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("security")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\nrate_limit_rpm = {RPM}\nbody_timeout_s = 2\n[node.api_key_rpm]\n"{FREE}" = 0\n\n'
                   f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\n')
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--cluster-secret", SECRET,
                 "--api-key", LIMITED, "--api-key", FREE, "--node-id", "n0", "--log-level", "DEBUG",
                 models=(MODEL,)) as n:
        yield n


def post(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def rejected(node) -> dict[str, float]:
    out = {}
    for line in fetch(node.url + "/metrics")[1].splitlines():
        if line.startswith("aivailable_cluster_rejected_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def chat(node, key: str = FREE) -> str:
    c = openai.OpenAI(base_url=node.api, api_key=key, max_retries=0, timeout=60)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    return r.choices[0].finish_reason


def peer_post(node, path: str, data: bytes, sender: str = "peer-x") -> tuple[int, bytes]:
    """POST over the TLS cluster port with a certificate for `sender` (a peer holding the secret)."""
    return peertls.post(node.url, path, data, SECRET, sender, timeout=30)


@pytest.mark.parametrize("endpoint", ["gossip", "files", "keys"])
def test_hostile_cluster_messages_are_refused_counted_shown_and_harmless(node, endpoint):
    """Past TLS (an insider with the secret), the envelope checks still refuse each bad message."""
    url = "/_cluster/" + endpoint
    secret = SECRET.encode()
    before = rejected(node)
    expect: dict[str, int] = {}
    limit = keysync.MAX_BYTES if endpoint == "keys" else envelope.MAX_BYTES
    for what, data, status, reason in bad_envelopes(secret, "n0", limit):
        got, body = peer_post(node, url, data)
        assert got == status, (what, got, body)
        assert body.decode() == reason  # the reason and nothing else: no echo of what was sent
        expect[reason] = expect.get(reason, 0) + 1
    # A valid message: an empty gossip, or a request for a file this node does not hold (404 after the checks).
    # A valid key-set exchange is answered with this node's set (salted hashes only) in a signed envelope.
    valid = {"gossip": Gossip(updates=()), "files": FileRequest(sha256="0" * 64, chunk_size=1 << 20),
             "keys": KeySetSync(records=[])}[endpoint]
    accepted = {"gossip": 204, "files": 404, "keys": 200}[endpoint]
    good = seal(valid, secret, sender="peer-x")
    assert peer_post(node, url, good)[0] == accepted
    assert peer_post(node, url, good) == (400, b"replayed")
    expect["replayed"] = 1
    for skew in (-20.0, 20.0):  # clock skew inside the 30 s window is accepted
        assert peer_post(node, url, seal(valid, secret, sender="peer-x", ts=time.time() + skew))[0] == accepted
    # Signed as peer-x over a connection whose certificate is peer-y's: refused.
    assert peer_post(node, url, seal(valid, secret, sender="peer-x"), sender="peer-y") == (403, b"wrong_node_cert")
    expect["wrong_node_cert"] = 1
    # The same message in plaintext on the API port: refused (peers must use the TLS cluster port).
    assert post(node.url + url, seal(valid, secret, sender="peer-x"))[0] == 421
    expect["plaintext"] = 1
    after = rejected(node)
    for reason, n in expect.items():
        assert after.get(reason, 0) - before.get(reason, 0) == n, reason
    shown = node.cluster()["security"]["cluster_rejected"]
    assert {r: shown.get(r, 0) for r in expect} == {r: int(after[r]) for r in expect}
    assert 'id="security"' in fetch(node.url + "/")[1]  # the status page renders that table
    # Still serving: healthy, leading its cluster, answering the model.
    assert get_json(node.url + "/health")["status"] == "ok"
    assert node.cluster()["leader"] == "n0"
    assert chat(node) in ("stop", "length")


def test_nothing_private_is_readable_under_cluster_paths_without_the_secret(node):
    routes = {(r.method, r.resource.canonical) for r in build_app(FakeNode()).router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/_cluster/")}
    assert routes == {("POST", "/_cluster/gossip"), ("POST", "/_cluster/files"), ("POST", "/_cluster/keys")}, \
        "a new /_cluster/ route needs a check here"
    probes = ["/_cluster/gossip", "/_cluster/files", "/_cluster/keys", "/_cluster/", "/_cluster/state", "/_cluster/members", "/_cluster/secret",
              "/_cluster/placement", "/_cluster/../api/cluster"]
    for path in probes:
        for status, body in (fetch(node.url + path),  # plain API port: refused
                             (lambda r: (r[0], r[1].decode()))(peertls.post(node.url, path, None, SECRET, method="GET"))):
            assert status in (404, 405, 421), (path, status)
            assert SECRET not in body and "voted_for" not in body and "term" not in body, (path, body[:200])
    # A valid frame from someone without the secret (but past TLS) gets only the reason, and changes nothing.
    term = node.cluster()["term"]
    status, body = peer_post(node, "/_cluster/gossip", seal(Gossip(updates=()), b"not-the-cluster-secret-000"))
    assert (status, body) == (401, b"bad_signature")
    assert node.cluster()["term"] == term and [n["id"] for n in node.cluster()["nodes"]] == ["n0"]


def test_api_keys_are_rate_limited_per_key(node):
    limited = openai.OpenAI(base_url=node.api, api_key=LIMITED, max_retries=0)
    free = openai.OpenAI(base_url=node.api, api_key=FREE, max_retries=0)
    ok = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(RPM + 1):  # a full bucket holds RPM requests (a minute's worth)
            limited.models.list()
            ok += 1
    assert ok == RPM
    err = e.value.body if isinstance(e.value.body, dict) else {}
    assert err.get("code") == "rate_limit_exceeded" and err.get("type") == "rate_limit_exceeded", err
    assert fingerprint(LIMITED, SECRET.encode()) in err["message"] and LIMITED not in err["message"]
    retry = int(e.value.response.headers["Retry-After"])
    assert 1 <= retry <= 60 // RPM + 1
    for _ in range(RPM * 3):  # another key is not affected, and an override of 0 is unlimited
        free.models.list()
    with pytest.raises(openai.AuthenticationError):  # a wrong key is refused before any limit
        openai.OpenAI(base_url=node.api, api_key="sk-wrong-guess-000", max_retries=0).models.list()
    metrics = fetch(node.url + "/metrics")[1]
    assert f'aivailable_rate_limited_total{{key="{fingerprint(LIMITED, SECRET.encode())}"}} 1.0' in metrics
    assert node.cluster()["security"]["rate_limited"] == {fingerprint(LIMITED, SECRET.encode()): 1}


def test_a_request_forwarded_by_a_peer_is_charged_only_where_it_entered(node):
    """A peer's signed hop header (api/hop.py) spares the key's bucket here; a forged, replayed, stale
    or misdirected one is ignored, so clients cannot skip their limit by sending the header."""
    import time

    from aivailable.api import hop

    limited = openai.OpenAI(base_url=node.api, api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(RPM + 1):  # empty the bucket (whatever earlier tests left in it)
            limited.models.list()

    def models(header: str | None) -> int:  # as a peer forwards: over the TLS cluster port
        return peertls.post(node.url, "/v1/models", None, SECRET, "n1", method="GET", headers={
            "Authorization": f"Bearer {LIMITED}", **({hop.HEADER: header} if header else {})})[0]

    good = hop.sign(SECRET.encode(), "n1", "/v1/models", time.time())
    plain = urllib.request.Request(node.api + "/models", headers={"Authorization": f"Bearer {LIMITED}", hop.HEADER: good})
    with pytest.raises(urllib.error.HTTPError) as misdirected:  # a forwarded request in plaintext: refused
        urllib.request.urlopen(plain, timeout=10)
    assert misdirected.value.code == 421
    assert models(good) == 200  # forwarded: charged on the entry node, not here
    assert models(good) == 429  # the same header again is a replay
    assert models(hop.sign(b"not-the-cluster-secret-000", "n1", "/v1/models", time.time())) == 429
    assert models(hop.sign(SECRET.encode(), "n1", "/v1/models", time.time() - 120)) == 429
    assert models(hop.sign(SECRET.encode(), "n1", "/v1/chat/completions", time.time())) == 429
    assert models("n1.1.2.3") == 429 and models("x" * 600) == 429
    # The key itself is still checked on a signed hop.
    assert peertls.post(node.url, "/v1/models", None, SECRET, "n1", method="GET", headers={
        "Authorization": "Bearer sk-wrong-guess-000",
        hop.HEADER: hop.sign(SECRET.encode(), "n1", "/v1/models", time.time())})[0] == 401


def raw_http(node, head: bytes, body: bytes, *, cluster_port: bool = False) -> tuple[int, bytes]:
    """Send bytes as they are (what no well-behaved client would send); (status, body) of the answer.
    `cluster_port`: over TLS to the cluster port, with a peer certificate."""
    port = node.port + 1 if cluster_port else node.port
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection((node.host, port), timeout=30))
        if cluster_port:
            s = stack.enter_context(peertls.peer_context(SECRET).wrap_socket(s, server_hostname=node.host))
        s.sendall(head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_broken_and_stalled_bodies_get_clean_errors(node):
    auth = f"Authorization: Bearer {FREE}".encode()
    gz = b"\x1f\x8b not gzip at all"
    status, body = raw_http(node, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Encoding: gzip\r\n" + auth +
                            b"\r\nContent-Length: %d" % len(gz), gz)
    assert status == 400 and "could not be read" in json.loads(body)["error"]["message"], body
    t0 = time.monotonic()  # promises 100 bytes, sends 7, then waits: 408 after body_timeout_s, not a hang
    status, body = raw_http(node, b"POST /v1/chat/completions HTTP/1.1\r\n" + auth + b"\r\nContent-Length: 100",
                            b'{"model')
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout", body
    assert time.monotonic() - t0 < 25
    for endpoint in (b"gossip", b"files"):
        status, body = raw_http(node, b"POST /_cluster/" + endpoint + b" HTTP/1.1\r\nContent-Encoding: gzip\r\n"
                                b"Content-Length: %d" % len(gz), gz, cluster_port=True)
        assert (status, body) == (400, b"malformed"), endpoint
    # Requests aiohttp cannot parse at all: a bad chunk size, a header without a colon, a broken request line.
    for head, body in ((b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n" + auth,
                        b"zz\r\n{}\r\n0\r\n\r\n"),
                       (b"POST /v1/chat/completions HTTP/1.1\r\nNot a header\r\n" + auth, b""),
                       (b"POST /v1/chat/completions HTTP/9.9 extra", b"")):
        status, answer = raw_http(node, head, body)
        err = json.loads(answer)["error"]
        assert status == 400 and err["code"] == "malformed_http", answer
        assert err["message"].startswith("The HTTP request could not be parsed:"), err
    assert get_json(node.url + "/health")["status"] == "ok"
    assert "Traceback" not in node.log() and "refused an unparsable HTTP request" in node.log()


def test_no_key_or_secret_in_any_page_metric_or_log(node):
    status, body = post(node.api + "/chat/completions", json.dumps({"model": MODEL}).encode())
    assert status == 401
    texts = [fetch(node.url + p)[1] for p in ("/", "/api/cluster", "/metrics", "/openapi.json", "/health")]
    texts.append(json.dumps(node.cluster()))
    texts.append(node.log())
    for secret in (SECRET, LIMITED, FREE, "sk-wrong-guess-000"):
        for text in texts:
            assert secret not in text
    assert node.cluster()["security"]["api_keys_required"] is True

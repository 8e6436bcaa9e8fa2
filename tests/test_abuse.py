"""Abuse of a live node: every case of the outside probe in issue 20, against real node processes.

One node serves the real Gemma model, with API keys, a CORS origin and a Host allow-list; another (no
model) runs under a low open-file limit for the connection cases. Each test names the defect it guards.

Cases that already held up in the probe are kept by their own modules, not repeated here:
- API keys (401, constant-time check), per-key rate limits and signed hops: tests/test_security.py
  (test_api_keys_are_rate_limited_per_key, test_a_request_forwarded_by_a_peer_is_charged_only_where_it_entered)
  and tests/test_api_errors.py (test_missing_and_wrong_api_key_is_401);
- signed-envelope checks on /_cluster/* (bad signature, skew, replay, size, truncation, versions):
  tests/test_security.py test_hostile_cluster_messages_are_refused_counted_shown_and_harmless, tests/test_envelope.py;
- body limits: tests/test_api_errors.py test_huge_body_is_413; broken and stalled bodies, unparsable HTTP:
  tests/test_security.py test_broken_and_stalled_bodies_get_clean_errors;
- schema fuzzing of every endpoint: tests/test_api_fuzz.py; the status page's escaping: tests/test_status_page.py.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from aivailable.api import hop
from aivailable.api.ratelimit import fingerprint
from aivailable.gossip import envelope
from aivailable.gossip.messages import FileRequest
from tests import peertls
from tests.nodeproc import get_json, serving

MODEL = "gemma-3-270m"
SECRET = "abuse-test-secret-0123456789abcdef"
KEY, LIMITED = "sk-abuse-free-0123456789", "sk-abuse-limited-0123456789"
APP_ORIGIN = "http://app.example:3000"
HOST_NAME = "node.example"


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_path):
    tmp = tmp_path_factory.mktemp("abuse")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\nrate_limit_rpm = 1\n[node.api_key_rpm]\n"{KEY}" = 0\n\n'
                   f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 512\n')
    env = {"AIVAILABLE_CORS_ORIGINS": APP_ORIGIN, "AIVAILABLE_ALLOWED_HOSTS": HOST_NAME}
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--cluster-secret", SECRET,
                 "--api-key", KEY, "--api-key", LIMITED, "--node-id", "n0", models=(MODEL,), env=env) as n:
        yield n


def call(node, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         key: str | None = KEY, as_peer: str | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) of one request sent with exactly these headers; `as_peer`: over
    the TLS cluster port with a certificate for that node id (as a peer of the cluster sends)."""
    if as_peer is None:
        conn = http.client.HTTPConnection(node.host, node.port, timeout=60)
    else:
        conn = http.client.HTTPSConnection(node.host, node.port + 1, timeout=60,
                                           context=peertls.peer_context(SECRET, as_peer))
    hdrs = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        raw = r.read()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally:
        conn.close()


JSON = {"Content-Type": "application/json"}
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def error(body: dict, status: int, got: int) -> dict:
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# -- defect 5: client-triggered 500s, hop headers -----------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999999999999999", "²", "0x2", "17"])
def test_a_malformed_hop_counter_is_a_400_naming_the_header(node, value):
    status, _, body = call(node, "POST", "/v1/chat/completions", CHAT, {**JSON, "X-AIvailable-Hops": value})
    err = error(body, 400, status)
    assert err["param"] == "X-AIvailable-Hops" and "X-AIvailable-Hops" in err["message"]


def test_an_unsigned_hop_counter_from_a_client_counts_for_nothing(node):
    """A client's own `X-AIvailable-Hops` neither makes its request "forwarded" (local replicas only, no
    demand) nor trips the routing-loop guard: only a hop signed with the cluster secret does."""
    for value in ("1", "2", "16"):
        status, _, body = call(node, "POST", "/v1/chat/completions", CHAT, {**JSON, "X-AIvailable-Hops": value})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, (value, body)
    signed = hop.sign(SECRET.encode(), "n9", "/v1/chat/completions", time.time())
    status, _, body = call(node, "POST", "/v1/chat/completions", CHAT,
                           {**JSON, "X-AIvailable-Hops": "2", hop.HEADER: signed}, as_peer="n9")
    assert status == 502 and body["error"]["code"] == "upstream_failed", body  # a real loop is still caught


@pytest.mark.parametrize("raw, says", [
    (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"model": "m", "messages": ' + b"[" * 70 + b"]" * 70 + b"}", "nested too deeply"),
    (b'{"model": "m", "messages": [], "max_tokens": ' + b"7" * 5000 + b"}", "integer of 5000 digits"),
    (b'{"model": "m", "messages": [], "seed": -' + b"7" * 101 + b"}", "integer of 101 digits"),
    (b'{"model": "m", "messages": [], "repeat_penalty": Infinity}', "Infinity"),
    (b'{"model": "m", "messages": [], "temperature": NaN}', "NaN"),
    (b'{"model": "m", "messages": [], "top_p": 1e999}', "out of range"),
])
def test_hostile_json_is_a_400_naming_the_problem_never_a_traceback(node, raw, says):
    status, _, body = call(node, "POST", "/v1/chat/completions", raw, JSON)
    assert says in error(body, 400, status)["message"]
    assert get_json(node.url + "/health")["status"] == "ok"
    assert "Traceback" not in node.log() and "internal error" not in node.log()


# -- defect 4: browsers, Content-Type, CORS, Host ---------------------------------------------------------

@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/json; charset=latin-1"])
def test_a_body_that_is_not_declared_json_is_a_415(node, ctype):
    """What a web page can POST without a preflight (no type, text/plain, a form) is refused."""
    status, _, body = call(node, "POST", "/v1/chat/completions", CHAT, {"Content-Type": ctype} if ctype else {})
    err = error(body, 415, status)
    assert err["param"] == "Content-Type" and "application/json" in err["message"]
    assert (ctype or "none") .split(";")[0] in err["message"]


def test_json_with_a_charset_and_the_official_client_still_work(node):
    status, _, body = call(node, "POST", "/v1/chat/completions", CHAT, {"Content-Type": "Application/JSON; charset=UTF-8"})
    assert status == 200, body
    out = openai.OpenAI(base_url=node.api, api_key=KEY, max_retries=0, timeout=60).completions.create(
        model=MODEL, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens >= 1


def test_cors_preflights_are_answered_deliberately(node):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, hdrs, body = call(node, "OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example", **ask},
                              key=None)
    assert status == 403 and "http://evil.example" in body["error"]["message"]
    assert not any(h.startswith("access-control-allow") for h in hdrs), hdrs
    status, hdrs, _ = call(node, "OPTIONS", "/v1/chat/completions", headers={"Origin": APP_ORIGIN, **ask}, key=None)
    assert status == 204 and hdrs["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in hdrs["access-control-allow-methods"]
    assert hdrs["access-control-allow-headers"] == "authorization,content-type"
    status, hdrs, body = call(node, "POST", "/v1/chat/completions", CHAT, {**JSON, "Origin": APP_ORIGIN})
    assert status == 200 and hdrs["access-control-allow-origin"] == APP_ORIGIN, body


def test_cross_origin_posts_from_other_origins_are_403(node):
    status, hdrs, body = call(node, "POST", "/v1/chat/completions", CHAT, {**JSON, "Origin": "http://evil.example"})
    assert "http://evil.example" in error(body, 403, status)["message"]
    assert "access-control-allow-origin" not in hdrs
    own = f"http://{node.host}:{node.port}"  # the node's own page (same origin) is not cross-origin
    status, _, body = call(node, "POST", "/v1/chat/completions", CHAT, {**JSON, "Origin": own})
    assert status == 200, body


def test_host_allow_list_stops_dns_rebinding(node):
    status, _, body = call(node, "GET", "/v1/models", headers={"Host": f"attacker.example:{node.port}"})
    assert "attacker.example" in error(body, 403, status)["message"]
    assert call(node, "GET", "/api/cluster", headers={"Host": "attacker.example"}, key=None)[0] == 403
    for host in (f"{HOST_NAME}:{node.port}", f"{node.host}:{node.port}", f"[::1]:{node.port}"):
        assert call(node, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
    with socket.create_connection((node.host, node.port), timeout=10) as s:  # HTTP/1.0 without Host: no browser
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        head = s.recv(100)
        assert head.split(b" ")[1] == b"200", head


def test_security_headers_on_the_status_page_and_the_api(node):
    status, hdrs, _ = call(node, "GET", "/", key=None)
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    csp = hdrs["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    for path in ("/", "/api/cluster", "/health", "/v1/models", "/no/such/path"):
        hdrs = call(node, "GET", path)[1]
        assert hdrs["x-frame-options"] == "DENY" and hdrs["x-content-type-options"] == "nosniff", path
        assert hdrs["referrer-policy"] == "no-referrer" and "content-security-policy" in hdrs, path


# -- defect 6: keyed fingerprints --------------------------------------------------------------------------

def test_key_fingerprints_on_open_pages_are_keyed_with_the_secret(node):
    import hashlib

    limited = openai.OpenAI(base_url=node.api, api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):
            limited.models.list()
    plain = "key-" + hashlib.sha256(LIMITED.encode()).hexdigest()[:8]
    keyed = fingerprint(LIMITED, SECRET.encode())
    metrics = call(node, "GET", "/metrics", key=None)[2].get("raw", "")
    shown = json.dumps(node.cluster()["security"])
    assert keyed in metrics and keyed in shown
    assert plain not in metrics and plain not in shown and plain not in node.log()


# -- defect 7: sha256 from peers -----------------------------------------------------------------------------

@pytest.mark.parametrize("sha", ["../../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x", ""])
def test_a_signed_file_request_for_a_non_sha256_is_refused(node, sha):
    sealed = envelope.seal(FileRequest(sha256=sha, chunk_size=1 << 20, chunk=-1), SECRET.encode(), "n9", time.time(),
                           os.urandom(12))
    status, _, body = call(node, "POST", "/_cluster/files", sealed, key=None, as_peer="n9")
    assert (status, body.get("raw")) == (400, "malformed")
    assert "is not 64 lowercase hex digits" in node.log()


# -- defect 3: idle connections ---------------------------------------------------------------------------

NOFILE = 400


@pytest.fixture(scope="module")
def small_node(tmp_path_factory):
    """A node without models under `ulimit -n 400` (soft and hard), short header and keep-alive timeouts."""
    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    env = {"AIVAILABLE_HEADER_TIMEOUT_S": "3", "AIVAILABLE_KEEPALIVE_TIMEOUT_S": "3"}
    with serving(tmp_path_factory.mktemp("conns"), "--simulate-gpu", "g0:1024", env=env, preexec_fn=low_nofile) as n:
        yield n


def closed_by_server(sockets: list[socket.socket], within_s: float) -> int:
    """How many of `sockets` the server closed (EOF or reset) within `within_s` seconds."""
    open_ = set(sockets)
    deadline = time.monotonic() + within_s
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.5)
        for s in ready:
            try:
                if s.recv(4096) == b"":
                    open_.discard(s)
            except OSError:
                open_.discard(s)
    return len(sockets) - len(open_)


def test_silent_connections_cannot_exhaust_a_node(small_node):
    """390 silent connections from one address against a node with 400 file descriptors: /health still
    answers (the address is capped), and every silent connection is closed after header_timeout_s."""
    silent = []
    try:
        for _ in range(390):
            s = socket.socket()
            s.bind(("127.0.0.3", 0))
            s.settimeout(10)
            s.connect((small_node.host, small_node.port))
            silent.append(s)
        time.sleep(0.5)
        assert get_json(small_node.url + "/health", timeout=10)["status"] == "ok"
        assert closed_by_server(silent, 60) == len(silent)
    finally:
        for s in silent:
            s.close()
    log = small_node.log()
    assert "open-file limit 400" in log and "client 127.0.0.3 holds 256 connections" in log


def test_trickled_headers_and_idle_keepalive_connections_are_closed(small_node):
    trickle = socket.create_connection((small_node.host, small_node.port), timeout=10)
    idle = http.client.HTTPConnection(small_node.host, small_node.port, timeout=10)
    try:
        t0 = time.monotonic()
        trickle.sendall(b"GET /health HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - t0 < 30 and not closed:
            try:
                trickle.sendall(b"X-Slow: 1\r\n")
                if select.select([trickle], [], [], 1.0)[0]:
                    closed = trickle.recv(4096) == b""
            except OSError:  # reset by the server
                closed = True
        assert closed, "a client trickling its headers kept its connection for 30 s"
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        assert closed_by_server([idle.sock], 30) == 1  # closed once idle past keepalive_timeout_s
    finally:
        trickle.close()
        idle.close()


# -- defect 8: smaller ones ------------------------------------------------------------------------------------

def test_an_infinite_repeat_penalty_is_refused_by_the_schema_too():
    """The JSON parser refuses Infinity and 1e999 (above); the schema refuses a non-finite penalty from any
    other source (e.g. a decoded body built in Python)."""
    from aivailable.errors import InvalidRequest
    from aivailable.wire.schemas import parse_request

    for bad in (float("inf"), float("nan")):
        with pytest.raises(InvalidRequest) as e:
            parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "repeat_penalty": bad})
        assert e.value.param == "repeat_penalty"


def test_model_names_are_restricted_wherever_they_enter(tmp_path):
    """Config and --model: exit 2 naming the bad name; a dropped file whose name is not a model name is not
    offered (and the log says why); names with `/`, `+` and `:` are allowed."""
    import subprocess
    import sys

    from tests.ggufgen import write_model
    from tests.nodeproc import REPO

    for flag in ("bad name=/x.gguf", "<script>=/x.gguf", "a" * 129 + "=/x.gguf"):
        run = subprocess.run([sys.executable, "-m", "aivailable", "up", "--no-mdns", "--state-dir", str(tmp_path / "s"),
                              "--model", flag], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "is not allowed: use 1-128 characters" in run.stderr, run.stderr
        assert flag.partition("=")[0][:20] in run.stderr
    models = tmp_path / "models"
    models.mkdir()
    write_model(models / "bad name.gguf", "gemma3", 1, 64, 2, 1, 128, 512, 256)
    write_model(models / "org+tiny.gguf", "gemma3", 1, 64, 2, 1, 128, 512, 256, seed=1)
    with serving(tmp_path, "--models-dir", str(models), "--simulate-gpu", "g0:1024") as n:
        deadline = time.monotonic() + 60
        names: set[str] = set()
        while "org+tiny" not in names and time.monotonic() < deadline:
            names = {m["id"] for m in get_json(n.api + "/models")["data"]}
            time.sleep(0.5)
        assert "org+tiny" in names and "bad name" not in names, names
        assert "its name 'bad name' is not a model name" in n.log()


# -- defect 4 in a real browser ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_node(tmp_path_factory, gemma_path):
    """A node without API keys (the kind any web page could drive before), serving the real model."""
    with serving(tmp_path_factory.mktemp("open"), "--model", f"{MODEL}={gemma_path}:512", "--simulate-gpu",
                 "g0:4096", models=(MODEL,)) as n:
        yield n


def chat_requests_served(node) -> float:
    text = call(node, "GET", "/metrics", key=None)[2].get("raw", "")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("aivailable_requests_total{") and f'model="{MODEL}"' in line)


@contextlib.contextmanager
def attacker_site() -> Iterator[str]:
    """A web server on another loopback address (another origin) serving an innocent-looking page. A real
    socket, not a Playwright route: Chromium refuses requests to local addresses from a page it cannot
    place in the local address space (Private Network Access), which would hide what the node does."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body>cat pictures</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_page_on_another_origin_cannot_drive_an_unkeyed_node(open_node):
    """Chromium on a page from another origin POSTs a chat request to the node, as a CORS-simple request
    (text/plain, no preflight) and as JSON (preflight): neither reaches the model."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.fail("Debian's chromium is required for this test: apt-get install chromium (.ci/run does it)")
    before = chat_requests_served(open_node)
    with sync_playwright() as p, attacker_site() as attacker:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(attacker)
            outcomes = page.evaluate("""async ([url, body]) => {
                const out = [];
                for (const type of ["text/plain", "application/json"]) {
                    try {
                        const r = await fetch(url, {method: "POST", headers: {"Content-Type": type}, body});
                        out.push(String(r.status));
                    } catch (e) { out.push("blocked"); }
                }
                return out;
            }""", [open_node.api + "/chat/completions", CHAT.decode()])
        finally:
            browser.close()
    assert outcomes == ["blocked", "blocked"], outcomes
    assert chat_requests_served(open_node) == before, "a cross-origin page made the node run the model"
    status, _, body = call(open_node, "POST", "/v1/chat/completions", CHAT, JSON, key=None)
    assert status == 200 and chat_requests_served(open_node) == before + 1, body  # the counter does count

"""HTTPS for clients on real node processes: `--tls auto` trusted through `aivailable ca` (the official openai
client, the failover client, curl-style fetches), verification really on, the redirect port, a node with the
lab's own certificate (`--tls-cert/--tls-key`), a bad key refused at start, and a request proxied between
two `--tls auto` nodes (and /v1/responses, which calls its own node's API)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.request

import httpx
import openai
import pytest
from cryptography.hazmat.primitives import serialization

from aivailable.client import openai_client
from tests.nodeproc import REPO, free_port, serving, start_node
from tests.test_https_unit import make_ca, make_server_cert

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "Say hello"}]


def aivailable_ca(*args: str) -> tuple[bytes, str]:
    """`python -m aivailable ca ARGS`: (PEM on stdout, stderr)."""
    run = subprocess.run([sys.executable, "-m", "aivailable", "ca", *args], capture_output=True, cwd=REPO,
                         timeout=60, check=True)
    return run.stdout, run.stderr.decode()


def trusting(ca_path) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(ca_path)), timeout=120)


def chat(base_url: str, http_client: httpx.Client, **kw) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, http_client=http_client)
    return c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, temperature=0, **kw)


@pytest.fixture(scope="module")
def auto_node(tmp_path_factory, gemma_path):
    """One node with --tls auto and a redirect port; its cluster secret made at start in its state dir."""
    tmp = tmp_path_factory.mktemp("https-auto")
    cfg = tmp / "node.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\n')
    redirect = free_port()
    with serving(tmp, "--config", str(cfg), "--simulate-gpu", "g0:4096", "--node-id", "n0", "--tls", "auto",
                 "--tls-redirect-port", str(redirect), models=(MODEL,), scheme="https") as n:
        n.redirect_port = redirect
        pem, stderr = aivailable_ca("--state-dir", str(n.state_dir))
        n.ca = tmp / "ca.pem"
        n.ca.write_bytes(pem)
        n.ca_stderr = stderr
        yield n


def _cert_error(exc: BaseException) -> BaseException | None:
    """The certificate verification error behind an openai client error, if any."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    return cause


def test_openai_client_trusting_the_ca_of_aivailable_ca_gets_an_answer(auto_node):
    r = chat(auto_node.api, trusting(auto_node.ca))
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    security = auto_node.cluster()["security"]  # verified against the CA (NodeProc.ca is set)
    assert security["client_api"] == {"scheme": "https", "url": f"https://127.0.0.1:{auto_node.port}/",
                                      "certificate": "cluster CA (tls = auto)",
                                      "redirect_port": auto_node.redirect_port}
    assert security["cluster_tls"]["ca_fingerprint"] in auto_node.ca_stderr  # printed by `aivailable ca`
    assert f"status page on https://127.0.0.1:{auto_node.port}/" in auto_node.log()


def test_without_the_ca_the_certificate_is_refused(auto_node):
    with pytest.raises(openai.APIConnectionError) as info:
        chat(auto_node.api, httpx.Client(timeout=30))  # the system's CAs only
    assert isinstance(_cert_error(info.value), ssl.SSLCertVerificationError)
    with pytest.raises(http.client.RemoteDisconnected):  # plain HTTP to the HTTPS port: no answer
        conn = http.client.HTTPConnection("127.0.0.1", auto_node.port, timeout=15)
        conn.request("GET", "/health")
        conn.getresponse()


def test_failover_client_over_https_with_the_ca(auto_node):
    dead = f"https://127.0.0.1:{free_port()}"
    client = openai_client([dead, auto_node.url], verify=str(auto_node.ca), api_key="x", max_retries=0,
                           timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason is not None


def test_failover_client_given_a_ca_reaches_bare_host_port_nodes_over_https(auto_node):
    """A CA to verify with means HTTPS: a bare HOST:PORT is never sent the API key in plaintext."""
    client = openai_client([f"127.0.0.1:{auto_node.port}"], verify=str(auto_node.ca), api_key="x",
                           max_retries=0, timeout=120)
    assert str(client.base_url).startswith("https://")
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None


def test_failover_client_reports_the_untrusted_certificate_not_the_last_node_down(auto_node):
    dead = f"http://127.0.0.1:{free_port()}"
    client = openai_client([auto_node.url, dead], api_key="x", max_retries=0, timeout=30)  # system CAs only
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
    assert isinstance(_cert_error(info.value), ssl.SSLCertVerificationError), info.value.__cause__


def test_ca_pem_endpoint_serves_what_aivailable_ca_prints(auto_node):
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE  # `curl -k`, then compare
    with urllib.request.urlopen(auto_node.url + "/api/ca.pem", context=insecure, timeout=10) as r:
        assert r.read() == auto_node.ca.read_bytes()
        assert r.headers["Content-Type"].startswith("application/x-pem-file")


def test_redirect_port_answers_308_to_the_https_url(auto_node):
    conn = http.client.HTTPConnection("127.0.0.1", auto_node.redirect_port, timeout=10)
    conn.request("GET", "/api/cluster?x=1")
    r = conn.getresponse()
    assert r.status == 308
    assert r.getheader("Location") == f"https://127.0.0.1:{auto_node.port}/api/cluster?x=1"
    with urllib.request.urlopen(f"http://localhost:{auto_node.redirect_port}/health", timeout=10,
                                context=ssl.create_default_context(cafile=str(auto_node.ca))) as r:
        assert r.url == f"https://localhost:{auto_node.port}/health" and r.status == 200  # followed, verified


def test_browser_redirected_to_the_https_status_page_sees_its_https_url(auto_node):
    from playwright.sync_api import sync_playwright

    from tests.test_status_page import CHROMIUM

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()  # the test's CA is not Chromium's
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{auto_node.redirect_port}/")
            assert page.url == f"https://127.0.0.1:{auto_node.port}/"
            row = page.locator("#client-api")
            row.wait_for(timeout=10_000)
            assert f"HTTPS at https://127.0.0.1:{auto_node.port}/" in row.inner_text()
            assert f"port {auto_node.redirect_port} redirects to it" in row.inner_text()
            assert not errors, errors
        finally:
            browser.close()


def test_cli_status_verifies_the_node_and_trusts_ssl_cert_file(auto_node):
    cmd = [sys.executable, "-m", "aivailable", "status", "--json", "--url", auto_node.url]
    untrusted = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=60)
    assert untrusted.returncode == 1 and b"SSL_CERT_FILE=ca.pem" in untrusted.stderr
    env = {**os.environ, "SSL_CERT_FILE": str(auto_node.ca)}
    trusted = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=60, env=env)
    assert trusted.returncode == 0 and json.loads(trusted.stdout)["node_id"] == "n0"


def test_responses_api_calls_its_own_node_over_https(auto_node):
    c = openai.OpenAI(base_url=auto_node.api, api_key="x", max_retries=0, http_client=trusting(auto_node.ca))
    r = c.responses.create(model=MODEL, input="Say hello", max_output_tokens=4, temperature=0)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens >= 1


# ---- the operator's own certificate ----------------------------------------------------------------------


def test_node_with_the_labs_own_certificate(tmp_path):
    ca_key, ca_cert = make_ca("lab CA")
    key_pem, cert_pem = make_server_cert(ca_key, ca_cert)
    (tmp_path / "node.key").write_bytes(key_pem)
    (tmp_path / "node.crt").write_bytes(cert_pem)
    lab_ca = tmp_path / "lab-ca.pem"
    lab_ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    other_key, _ = make_server_cert(ca_key, ca_cert)
    (tmp_path / "other.key").write_bytes(other_key)
    bad = subprocess.run([sys.executable, "-m", "aivailable", "up", "--host", "127.0.0.1", "--port",
                          str(free_port()), "--state-dir", str(tmp_path / "bad-state"), "--no-mdns", "--tls-cert",
                          str(tmp_path / "node.crt"), "--tls-key", str(tmp_path / "other.key")],
                         capture_output=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and b"tls_key" in bad.stderr and b"does not belong" in bad.stderr
    assert b"Traceback" not in bad.stderr
    with serving(tmp_path, "--tls-cert", str(tmp_path / "node.crt"), "--tls-key", str(tmp_path / "node.key"),
                 scheme="https") as n:
        n.ca = lab_ca
        c = openai.OpenAI(base_url=n.api, api_key="x", max_retries=0, http_client=trusting(lab_ca))
        assert c.models.list().data == []  # no model: the TLS handshake and the API are what is tested
        assert n.cluster()["security"]["client_api"]["certificate"] == str(tmp_path / "node.crt")
        (tmp_path / "cluster-ca.pem").write_bytes(aivailable_ca("--state-dir", str(n.state_dir))[0])
        with pytest.raises(openai.APIConnectionError):  # the cluster CA does not vouch for the lab's cert
            openai.OpenAI(base_url=n.api, api_key="x", max_retries=0,
                          http_client=trusting(tmp_path / "cluster-ca.pem")).models.list()


# ---- two --tls auto nodes: the request enters at the node without the model -------------------------------


def test_request_proxied_between_two_tls_auto_nodes(tmp_path, gemma_path):
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{gemma_path}"\nctx = 256\nmax_replicas = 1\n')
    secret = tmp_path / "secret"
    secret.write_text("https-two-node-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    p1, p2 = free_port("127.0.0.1"), free_port("127.0.0.2")
    common = ("--config", str(cfg), "--cluster-secret-file", str(secret), "--tls", "auto")
    holder = start_node(tmp_path, *common, "--simulate-gpu", "g1:4096", "--node-id", "n1", host="127.0.0.1",
                        port=p1, name="n1", scheme="https")
    entry = start_node(tmp_path, *common, "--node-id", "n2", "--join", f"127.0.0.1:{p1}", host="127.0.0.2",
                       port=p2, name="n2", scheme="https")
    try:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(aivailable_ca("--cluster-secret-file", str(secret))[0])
        holder.ca = entry.ca = ca
        holder.wait_healthy()
        entry.wait_healthy()
        entry.wait_model(MODEL, timeout=180)
        c = openai.OpenAI(base_url=entry.api, api_key="x", max_retries=0, http_client=trusting(ca))
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT, max_tokens=4, temperature=0)
        assert raw.headers["X-AIvailable-Replica"].startswith("n1")  # served by the other node
        assert raw.parse().usage.completion_tokens >= 1
        raw = c.responses.with_raw_response.create(model=MODEL, input="Say hello", max_output_tokens=4)
        assert raw.headers["X-AIvailable-Replica"].startswith("n1") and raw.parse().output_text is not None
    finally:
        for n in (entry, holder):
            n.stop(timeout=15)

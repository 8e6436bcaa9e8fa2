"""HTTPS for clients, without a node process: settings checks, the server certificate and its errors (real
files, real TLS handshakes on loopback), the redirect's Location, and `aivailable ca`."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aivailable import api_tls
from aivailable.config import NodeConfig, load_settings
from aivailable.errors import ConfigError
from aivailable.gossip import tls
from tests.nodeproc import REPO

SECRET = b"https-unit-secret-0123456789abcdef"


def make_ca(name: str = "test lab CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA of the lab's own (not the cluster's), as an operator would have."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, names=("localhost",), ips=("127.0.0.1",)) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a server certificate signed by the CA."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def config_error(**node) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(None, node, [])
    return info.value.message


# ---- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "words"), [
    ({"tls_cert": "c.pem"}, "tls_cert is set without tls_key"),
    ({"tls_key": "k.pem"}, "tls_key is set without tls_cert"),
    ({"tls": "auto", "tls_cert": "c.pem", "tls_key": "k.pem"}, 'tls = "auto" issues its own'),
    ({"tls_names": ["lab.example"]}, "tls_names"),
    ({"tls": "auto", "insecure_cluster": True}, "insecure_cluster"),
    ({"tls_redirect_port": 8080}, "tls_redirect_port redirects to HTTPS"),
    ({"tls": "auto", "port": 8000, "tls_redirect_port": 8001}, "tls_redirect_port 8001 is the API port or the cluster"),
    ({"tls": "auto", "port": 8000, "tls_redirect_port": 8000}, "tls_redirect_port 8000"),
    ({"tls": "maybe"}, "node.tls"),
])
def test_bad_tls_settings_name_the_field(node, words):
    assert words in config_error(**node)


def test_good_tls_settings_and_the_default_is_plain_http():
    assert not NodeConfig().https
    auto = NodeConfig(tls="auto", tls_names="lab.example, 10.9.9.9", tls_redirect_port=8080)
    assert auto.https and auto.tls_names == ["lab.example", "10.9.9.9"]
    assert NodeConfig(tls_cert="c.pem", tls_key="k.pem").https


def test_up_flags_carry_the_tls_settings(tmp_path):
    from aivailable.cli import _parser

    args = _parser().parse_args(["up", "--tls", "auto", "--tls-name", "a.lab", "--tls-name", "b.lab",
                                 "--tls-redirect-port", "8080"])
    assert (args.tls, args.tls_names, args.tls_redirect_port) == ("auto", ["a.lab", "b.lab"], 8080)
    args = _parser().parse_args(["up", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert (args.tls_cert, args.tls_key) == ("c.pem", "k.pem")


# ---- the server certificate -----------------------------------------------------------------------------


def context_error(tmp_path, **node) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        api_tls.server_context(NodeConfig(**node), ca=None, names=[], directory=tmp_path, node_id="n0")
    return info.value


def test_operator_files_that_are_missing_not_pem_encrypted_or_mismatched_are_named(tmp_path):
    ca_key, ca_cert = make_ca()
    key_pem, cert_pem = make_server_cert(ca_key, ca_cert)
    other_key, _ = make_server_cert(ca_key, ca_cert)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "junk.pem").write_text("not a pem\n")
    locked = serialization.load_pem_private_key(key_pem, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "locked.pem").write_bytes(locked)
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    cases = [
        ({"tls_cert": str(tmp_path / "nope.pem"), "tls_key": key}, "tls_cert", "no such file"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "nope.pem")}, "tls_key", "no such file"),
        ({"tls_cert": str(tmp_path / "junk.pem"), "tls_key": key}, "tls_cert", "no PEM certificate"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "junk.pem")}, "tls_key", "no PEM private key"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "locked.pem")}, "tls_key", "passphrase"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "other.pem")}, "tls_key", "does not belong"),
    ]
    for node, param, words in cases:
        err = context_error(tmp_path, **node)
        assert err.param == param and param in err.message and words in err.message, (node, err.message)
    ctx = api_tls.server_context(NodeConfig(tls_cert=cert, tls_key=key), ca=None, names=[], directory=tmp_path,
                                 node_id="n0")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE
    assert api_tls.server_context(NodeConfig(), ca=None, names=[], directory=tmp_path, node_id="n0") is None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str) -> str:
    """One real TLS handshake over loopback; the protocol version agreed."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = srv.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_name) as s:
                version = s.version()
                s.sendall(b"x")
        finally:
            t.join(5)
    return version


def test_auto_certificate_chains_to_the_cluster_ca_names_the_node_and_is_private(tmp_path):
    ca = tls.derive_ca(SECRET)
    names = api_tls.auto_names(NodeConfig(tls="auto", host="127.0.0.7", tls_names=["lab.example"]), "10.1.2.3")
    assert {"10.1.2.3", "127.0.0.7", "localhost", "127.0.0.1", "lab.example", socket.gethostname()} <= set(names)
    ctx = api_tls.server_context(NodeConfig(tls="auto"), ca=ca, names=names, directory=tmp_path, node_id="n0")
    path = tmp_path / api_tls.AUTO_CERT_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    assert cert.issuer == ca.cert.subject
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= api_tls.AUTO_CERT_DAYS
    client = ssl.create_default_context(cadata=ca.pem.decode())
    for name in ("lab.example", "127.0.0.1", "localhost"):
        assert handshake(ctx, client, name) in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, client, "elsewhere.example")  # a name the certificate does not hold
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, ssl.create_default_context(), "localhost")  # the system's CAs do not know the cluster's
    renewed = api_tls.server_context(NodeConfig(tls="auto"), ca=ca, names=names, directory=tmp_path, node_id="n0")
    assert renewed is not None and x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number \
        != cert.serial_number  # a new certificate at every start


# ---- redirect ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "port", "path", "want"), [
    ("lab.example:8080", 8443, "/status?x=1", "https://lab.example:8443/status?x=1"),
    ("lab.example", 443, "/", "https://lab.example/"),
    ("[fe80::1]:8080", 8000, "/v1/models", "https://[fe80::1]:8000/v1/models"),
    ("", 8000, "/", "https://10.0.0.5:8000/"),
    ("evil\r\nSet-Cookie: x", 8000, "/a", "https://10.0.0.5:8000/a"),
])
def test_redirect_location_keeps_host_and_path(host, port, path, want):
    assert api_tls.https_location(host, "10.0.0.5", port, path) == want


def test_redirect_app_answers_308_for_every_method_and_path():
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> None:
        async with TestClient(TestServer(api_tls.redirect_app(8443, "10.0.0.5"))) as c:
            for method in ("GET", "POST", "HEAD"):
                r = await c.request(method, "/v1/chat/completions?a=b", allow_redirects=False,
                                    headers={"Host": "node.lab:80"})
                assert r.status == 308 and r.headers["Location"] == "https://node.lab:8443/v1/chat/completions?a=b"

    asyncio.run(run())


# ---- aivailable ca ---------------------------------------------------------------------------------------


def test_ca_command_prints_the_derived_ca_and_its_fingerprint(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    run = subprocess.run([sys.executable, "-m", "aivailable", "ca", "--cluster-secret-file", str(secret_file)],
                         capture_output=True, cwd=REPO, timeout=60)
    ca = tls.derive_ca(SECRET)
    assert run.returncode == 0 and run.stdout == ca.pem
    assert ca.fingerprint in run.stderr.decode()
    out = tmp_path / "ca.pem"
    run = subprocess.run([sys.executable, "-m", "aivailable", "ca", "--cluster-secret-file", str(secret_file),
                          "--out", str(out)], capture_output=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and out.read_bytes() == ca.pem and run.stdout == b""
    run = subprocess.run([sys.executable, "-m", "aivailable", "ca", "--state-dir", str(tmp_path / "empty")],
                         capture_output=True, cwd=REPO, timeout=60)
    assert run.returncode == 2 and b"--state-dir: no cluster secret" in run.stderr and b"Traceback" not in run.stderr

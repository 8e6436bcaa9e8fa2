"""TLS between nodes, in-process: the derived CA, node certificates, and the cluster listener
(`GuardedSite` with TLS) on both event loops the node may run (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import struct
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from aivailable.api.connections import GuardedSite
from aivailable.gossip import tls
from aivailable.gossip.peerhttp import PeerDialer

SECRET = b"cluster-secret-for-tls-tests-000"


def test_the_ca_is_the_same_on_every_node_and_differs_per_secret():
    a, b, other = tls.derive_ca(SECRET), tls.derive_ca(SECRET), tls.derive_ca(b"another-secret-0000000")
    assert a.pem == b.pem and a.fingerprint == b.fingerprint  # byte for byte: deterministic ECDSA
    assert a.pem != other.pem
    assert a.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_node_certificate_names_its_id_and_addresses(tmp_path):
    node = tls.node_tls(SECRET, "lab-gpu-3 (p40)", tmp_path, names=["10.0.0.7", "gpu3.lab"])
    assert oct(node.chain_path.stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificates(node.chain_path.read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls.node_dns_name("lab-gpu-3 (p40)") in san.get_values_for_type(x509.DNSName)
    assert "gpu3.lab" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    uri = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
    assert tls.peer_node_id({"subjectAltName": (("URI", uri),)}) == "lab-gpu-3 (p40)"
    cert.verify_directly_issued_by(tls.derive_ca(SECRET).cert)


def test_peer_urls_use_the_cluster_port_only_with_tls(tmp_path):
    secure = PeerDialer(tls.node_tls(SECRET, "n1", tmp_path))
    assert secure.url("10.0.0.5:8000", "/_cluster/gossip") == "https://10.0.0.5:8001/_cluster/gossip"
    assert secure.url("[fe80::1]:8000", "/x") == "https://[fe80::1]:8001/x"
    assert secure.options("n2")["server_hostname"] == tls.node_dns_name("n2")
    assert "server_hostname" not in secure.options(None)  # a seed: any certificate of the cluster
    assert PeerDialer().url("10.0.0.5:8000", "/x") == "http://10.0.0.5:8000/x" and PeerDialer().options("n2") == {}


def _run(loop_kind: str, coro_fn):
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


async def _listener(tmp: Path, refused: list, *, max_per_client: int = 1000, header_timeout_s: float = 5):
    app = web.Application()

    async def who(request: web.Request) -> web.Response:
        from aivailable.gossip.signed import peer_certificate_id
        return web.Response(text=f"{peer_certificate_id(request)}:{len(await request.read())}")

    app.router.add_post("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    server = tls.node_tls(SECRET, "server", tmp / "server")
    site = GuardedSite(runner, "127.0.0.1", 0, max_per_client=max_per_client, header_timeout_s=header_timeout_s,
                       tls=server.server_context(), on_tls_refused=lambda addr, why: refused.append((addr, why)))
    await site.start()
    return runner, site


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_many_new_connections_all_complete_and_name_their_peer(tmp_path, loop_kind):
    """Each connection a new handshake with the request right behind it (no keep-alive): none is lost,
    whatever the order in which the loop delivers the first bytes (see GuardedSite's _handshake)."""
    async def main():
        refused: list = []
        runner, site = await _listener(tmp_path, refused)
        dialer = PeerDialer(tls.node_tls(SECRET, "client-7", tmp_path / "client"))
        conn = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=20)) as s:
            async def one(i: int) -> str:
                async with s.post(dialer.url(f"127.0.0.1:{site.port - 1}", "/who"), data=b"x" * i,
                                  **dialer.options("server")) as r:
                    return await r.text()
            answers = await asyncio.gather(*(one(i) for i in range(150)))
        await runner.cleanup()
        assert answers == [f"client-7:{i}" for i in range(150)]
        assert refused == [] and site.guard.tls_refused == 0
    _run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_outsiders_are_refused_in_the_handshake_and_counted(tmp_path, loop_kind):
    async def main():
        refused: list = []
        runner, site = await _listener(tmp_path, refused)
        port = site.port

        async def attempt(ctx: ssl.SSLContext | None, hostname: str | None = None) -> str:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname)
                w.write(b"POST /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                await w.drain()
                data = await asyncio.wait_for(r.read(), 10)
                w.close()
                return data.decode(errors="replace")
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                return f"refused: {exc}"

        wrong_ca = tls.node_tls(b"another-cluster-secret-00", "intruder", tmp_path / "wrong").client_context(pinned=False)
        no_cert = ssl.create_default_context()
        no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
        mine = tls.node_tls(SECRET, "client", tmp_path / "client")
        outcomes = {
            "wrong secret": await attempt(wrong_ca),
            "no certificate": await attempt(no_cert),
            "plain HTTP": await attempt(None),
            "right secret, expecting another node id": await attempt(mine.client_context(), tls.node_dns_name("n9")),
        }
        ok = await attempt(mine.client_context(), tls.node_dns_name("server"))
        await asyncio.sleep(0.2)
        await runner.cleanup()
        for what, text in outcomes.items():
            assert "client:" not in text and "200 OK" not in text, (what, text)
        assert "Hostname mismatch" in outcomes["right secret, expecting another node id"]
        assert "200 OK" in ok and ok.endswith("client:0")
        reasons = [why for _, why in refused]
        assert len(refused) == 4 and site.guard.tls_refused == 4, refused  # the client-side refusal counts too
        assert sum("different cluster secret" in w for w in reasons) == 2, reasons  # they hung up on our certificate
        assert any("no client certificate" in w for w in reasons), reasons
        assert any("plain HTTP" in w for w in reasons), reasons
        assert all(addr == "127.0.0.1" for addr, _ in refused)
    _run(loop_kind, main)


def test_a_silent_connection_to_the_cluster_port_is_closed_after_the_header_timeout(tmp_path):
    async def main():
        refused: list = []
        runner, site = await _listener(tmp_path, refused)
        site.guard.header_timeout_s = 0.5
        with socket.create_connection(("127.0.0.1", site.port)) as s:
            s.settimeout(5)
            await asyncio.sleep(1.5)
            assert s.recv(10) == b""  # closed by the node
        await runner.cleanup()
        assert site.guard.timed_out + site.guard.tls_refused >= 1
    asyncio.run(main())


def _skewed_node(tmp: Path, node_id: str, ahead: dt.timedelta) -> tls.ClusterTLS:
    """A node of this cluster whose clock runs `ahead` of this machine's when it issues its certificate."""
    ca = tls.derive_ca(SECRET)
    key_pem, cert_pem = tls.issue(ca, node_id, node_id=node_id, now=dt.datetime.now(dt.UTC) + ahead)
    path = tmp / node_id / "node.pem"
    tls.write_private(path, key_pem + cert_pem)
    return tls.ClusterTLS(ca, node_id, path)


def test_a_peer_clock_hours_behind_still_accepts_the_certificate_and_days_ahead_is_named_a_clock_problem(tmp_path):
    async def main():
        refused: list = []
        runner, site = await _listener(tmp_path, refused)
        url = f"https://127.0.0.1:{site.port}/who"

        async def post(node: tls.ClusterTLS) -> str:
            async with (aiohttp.ClientSession() as s,
                        s.post(url, ssl=node.client_context(), server_hostname=tls.node_dns_name("server")) as r):
                return await r.text()

        hours = await post(_skewed_node(tmp_path, "six-hours-ahead", dt.timedelta(hours=6)))
        with pytest.raises(aiohttp.ClientError):
            await post(_skewed_node(tmp_path, "five-days-ahead", dt.timedelta(days=5)))
        await asyncio.sleep(0.2)
        await runner.cleanup()
        assert hours == "six-hours-ahead:0"
        assert len(refused) == 1, refused
        assert "not yet valid" in refused[0][1] and "check the clocks" in refused[0][1], refused
    asyncio.run(main())


def test_a_server_certificate_from_the_future_is_refused_by_the_caller_with_the_clock_hint(tmp_path):
    async def main():
        app = web.Application()
        runner = web.AppRunner(app)
        await runner.setup()
        future = _skewed_node(tmp_path, "server", dt.timedelta(days=5))
        site = GuardedSite(runner, "127.0.0.1", 0, max_per_client=10, header_timeout_s=5, tls=future.server_context())
        await site.start()
        me = tls.node_tls(SECRET, "client", tmp_path / "client")
        try:
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientConnectorCertificateError) as err:
                    await s.get(f"https://127.0.0.1:{site.port}/", ssl=me.client_context(),
                                server_hostname=tls.node_dns_name("server"))
        finally:
            await runner.cleanup()
        return str(err.value.certificate_error)
    why = asyncio.run(main())
    assert "not yet valid" in why and "check the clocks" in (tls.clock_hint(why) or "")
    assert tls.clock_hint("certificate verify failed: unable to get local issuer certificate") is None


def test_dialer_post_reads_a_large_answer_whole_over_tls_and_refuses_one_over_its_limit(tmp_path):
    """A key-set answer arrives in many TLS records: `post` returns all of it, or raises past `max_bytes`."""
    answer = bytes(range(256)) * 4096  # 1 MiB

    async def main():
        app = web.Application()

        async def big(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=answer)

        app.router.add_post("/big", big)
        runner = web.AppRunner(app)
        await runner.setup()
        server = tls.node_tls(SECRET, "server", tmp_path / "server")
        site = GuardedSite(runner, "127.0.0.1", 0, max_per_client=10, header_timeout_s=5,
                           tls=server.server_context())
        await site.start()
        dialer = PeerDialer(tls.node_tls(SECRET, "client", tmp_path / "client"))
        address = f"127.0.0.1:{site.port - 1}"
        try:
            async with aiohttp.ClientSession() as s:
                whole = await dialer.post(s, address, "server", "/big", b"x", max_bytes=len(answer))
                with pytest.raises(aiohttp.ClientPayloadError):
                    await dialer.post(s, address, "server", "/big", b"x", max_bytes=len(answer) - 1)
        finally:
            await runner.cleanup()
        return whole
    status, body = asyncio.run(main())
    assert status == 200 and body == answer


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_connections_that_die_in_the_handshake_give_their_place_back(tmp_path, loop_kind):
    """Resets (health checks, scans), silent and half-hello clients: none keeps counting against its
    address's max_per_client, so a real peer from that address still gets in, and no handshake is left
    pending."""
    async def main():
        runner, site = await _listener(tmp_path, [], max_per_client=4, header_timeout_s=0.5)
        loop = asyncio.get_running_loop()

        async def reset(payload: bytes) -> None:
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", site.port))
            if payload:
                await loop.sock_sendall(s, payload)
            await asyncio.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

        async def silent(payload: bytes) -> None:
            _, w = await asyncio.open_connection("127.0.0.1", site.port)
            w.write(payload)
            await asyncio.sleep(0.8)  # past header_timeout_s
            w.close()

        hello = b"\x16\x03\x01\x02\x00\x01"  # the start of a ClientHello, then nothing
        for _ in range(2):
            await asyncio.gather(*(reset(b"") for _ in range(4)), *(reset(hello) for _ in range(4)))
            await asyncio.gather(silent(b""), silent(hello))
        await asyncio.sleep(0.3)
        assert dict(site.guard.open) == {}
        me = tls.node_tls(SECRET, "good-peer", tmp_path / "good")
        r, w = await asyncio.open_connection("127.0.0.1", site.port, ssl=me.client_context(),
                                             server_hostname=tls.node_dns_name("server"))
        w.write(b"POST /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        answer = await asyncio.wait_for(r.read(), 5)
        w.close()
        await runner.cleanup()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return answer, pending
    answer, pending = _run(loop_kind, main)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"good-peer:0")
    assert pending == []


def test_a_private_key_is_written_0600_whatever_is_left_at_its_temporary_name(tmp_path):
    leftover = tmp_path / "node" / "node.pem.tmp"
    leftover.parent.mkdir()
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)  # e.g. from a copied state directory
    decoy = tmp_path / "elsewhere.txt"
    decoy.write_bytes(b"untouched")
    node = tls.node_tls(SECRET, "n1", tmp_path / "node")
    assert oct(node.chain_path.stat().st_mode & 0o777) == "0o600"
    (tmp_path / "node" / "node.pem.tmp").symlink_to(decoy)  # a link at the temporary name is not followed
    node = tls.node_tls(SECRET, "n1", tmp_path / "node")
    assert oct(node.chain_path.stat().st_mode & 0o777) == "0o600" and not node.chain_path.is_symlink()
    assert decoy.read_bytes() == b"untouched"


def test_authenticated_peers_are_not_held_to_the_per_address_cap_anonymous_connections_are(tmp_path):
    """An entry node may hold hundreds of forwarded streams to one holder: connections whose client
    certificate was verified leave the per-address count; anonymous ones (pre-handshake) stay capped."""
    async def main():
        runner, site = await _listener(tmp_path, [], max_per_client=2, header_timeout_s=5)
        me = tls.node_tls(SECRET, "entry", tmp_path / "entry")
        held = []
        for _ in range(6):  # kept open: six concurrent peer connections from one address
            r, w = await asyncio.open_connection("127.0.0.1", site.port, ssl=me.client_context(),
                                                 server_hostname=tls.node_dns_name("server"))
            w.write(b"POST /who HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"entry:0"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            held.append(w)
        counts = dict(site.guard.open), dict(site.guard.peers)
        silent = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(3)]
        await asyncio.sleep(0.2)
        refused = site.guard.refused
        for w in held + [w for _, w in silent]:
            w.close()
        await asyncio.sleep(0.3)
        after = dict(site.guard.open), dict(site.guard.peers)
        await runner.cleanup()
        return counts, refused, after
    counts, refused, after = asyncio.run(main())
    assert counts == ({}, {"127.0.0.1": 6})
    assert refused == 1  # the third anonymous connection from the address
    assert after == ({}, {})

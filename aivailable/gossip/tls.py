"""TLS between nodes: a certificate authority derived from the cluster secret, and mutual TLS contexts.

The cluster secret is the only thing an admin hands out, so the CA comes from it: HKDF-SHA256 of the
secret gives a P-256 private key, and the CA certificate over it is built from fixed fields and signed
with deterministic ECDSA (RFC 6979), so every node that holds the secret builds the same CA certificate,
byte for byte (`aivailable ca` prints the same PEM on every node, and its fingerprint identifies the
cluster). Nothing is exchanged to bootstrap it and no node is special: the CA has no holder to lose.
Whoever holds the secret can mint node certificates, which is the same trust the HMAC envelope already
places in the secret; rotating the secret rotates the CA.

Each node makes a fresh key pair at every start and signs its own certificate with the derived CA. The
certificate names the node id twice: a URI ``aivailable:node:<id>`` (read by the accepting side) and a
DNS name ``<40 hex of sha256(id)>.node.aivailable`` (any id becomes a valid host name), which the
connecting side puts in SNI with hostname checking on, so a connection to the wrong node fails in the
handshake, before any byte of the request is sent. It also names the node's addresses.

Cluster traffic uses a port of its own, the API port + 1 (etcd's client/peer split): the client API can
stay plain HTTP while every byte between nodes is encrypted and both sides are authenticated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLUSTER_PORT_OFFSET = 1
"""The cluster (peer) port is the API port + this."""
NODE_URI_PREFIX = "aivailable:node:"
NODE_DNS_SUFFIX = ".node.aivailable"
_CA_INFO = b"aivailable cluster CA v1"
_CA_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_CA_END = dt.datetime(2125, 1, 1, tzinfo=dt.UTC)
_BACKDATE = dt.timedelta(days=2)
"""A certificate `issue` makes is valid from this long before the issuing clock: peers whose clocks lag by hours
(NTP-less lab machines) still accept it, and the envelope's 30 s window names a skew as "stale"."""
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def cluster_port(api_port: int) -> int:
    """The port a node takes cluster traffic on, for a node whose API listens on `api_port`."""
    return api_port + CLUSTER_PORT_OFFSET


def cluster_address(api_address: str) -> str:
    """`host:port` of a node's cluster listener, from its API `host:port` (IPv6 hosts in brackets)."""
    host, _, port = api_address.rpartition(":")
    return f"{host}:{cluster_port(int(port))}"


def node_dns_name(node_id: str) -> str:
    """The DNS name that stands for `node_id` in certificates and SNI: any id becomes a valid host name."""
    return hashlib.sha256(node_id.encode()).hexdigest()[:40] + NODE_DNS_SUFFIX


@dataclass(frozen=True)
class ClusterCA:
    """The CA every holder of the cluster secret derives identically."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), hex: the same on every node of a cluster."""
        return self.cert.fingerprint(hashes.SHA256()).hex()


def derive_ca(secret: bytes) -> ClusterCA:
    """The cluster CA for `secret`: same key, same certificate bytes on every node."""
    seed = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=_CA_INFO).derive(secret)
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    pub = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aivailable"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"aivailable cluster CA {ski.digest.hex()[:12]}")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(pub)
            .serial_number(int.from_bytes(ski.digest[:16], "big") >> 1 | 1)
            .not_valid_before(_CA_EPOCH).not_valid_after(_CA_END)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
    return ClusterCA(key, cert)


def _ip_or_dns(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        if not n:
            continue
        try:
            ip = ipaddress.ip_address(n.strip("[]"))
        except ValueError:
            out.append(x509.DNSName(n))
        else:
            if not ip.is_unspecified:
                out.append(x509.IPAddress(ip))
    return out


def issue(ca: ClusterCA, common_name: str, *, node_id: str | None = None, names: list[str] = (),
          days: int = 3650, server: bool = True, client: bool = True,
          now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A new key and a certificate signed by `ca`, as (key PEM, certificate PEM). With `node_id` the
    certificate names the node (URI and DNS SANs, see the module docstring); `names` are host names or IP
    addresses it is also valid for, for `days` in all from two days before `now` (default: this machine's clock)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or dt.datetime.now(dt.UTC)
    sans = _ip_or_dns(list(names))
    if node_id is not None:
        sans = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + quote(node_id, safe="")),
                x509.DNSName(node_dns_name(node_id)), *sans]
    usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aivailable"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _BACKDATE).not_valid_after(now - _BACKDATE + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its own mode (and may be a symlink): start afresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


@dataclass(frozen=True)
class ClusterTLS:
    """This node's TLS material for cluster traffic: the CA, and where its key + certificate are on disk."""

    ca: ClusterCA
    node_id: str
    chain_path: Path

    def server_context(self) -> ssl.SSLContext:
        """For the cluster listener: TLS 1.3, a client certificate from the cluster CA required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.chain_path)
        ctx.load_verify_locations(cadata=self.ca.pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, pinned: bool = True) -> ssl.SSLContext:
        """For connecting to peers with this node's certificate. `pinned`: the peer's certificate must
        name the node id given as `server_hostname` (see `peer_hostname`); else any cluster certificate
        will do (seed addresses, whose node id is not known yet)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.chain_path)
        ctx.load_verify_locations(cadata=self.ca.pem.decode())
        ctx.check_hostname = pinned
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def node_tls(secret: bytes, node_id: str, directory: Path, names: list[str] = ()) -> ClusterTLS:
    """Derive the CA, make this node's key and certificate (written to `directory`/node.pem, 0600)."""
    ca = derive_ca(secret)
    key_pem, cert_pem = issue(ca, f"aivailable node {node_id}", node_id=node_id, names=list(names))
    path = Path(directory) / "node.pem"
    write_private(path, key_pem + cert_pem)
    return ClusterTLS(ca, node_id, path)


def clock_hint(why: str) -> str | None:
    """What an operator should check when a certificate was refused for its validity dates, else None."""
    if "not yet valid" in why or "has expired" in why:
        return ("its validity dates do not cover the checking machine's clock: check the clocks (NTP, "
                "`timedatectl`) of both machines")
    return None


def peer_node_id(peercert: dict | None) -> str | None:
    """The node id a verified peer certificate names (`SSLObject.getpeercert()` form), None if none."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(NODE_URI_PREFIX):
            return unquote(value[len(NODE_URI_PREFIX):])
    return None

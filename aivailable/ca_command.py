"""`aivailable ca`: print the cluster CA certificate, which HTTPS clients of `tls = "auto"` nodes trust.

The CA is derived from the cluster secret (aivailable/gossip/tls.py), so this runs on any machine holding
the secret, node running or not, and prints the same PEM on every node. Its SHA-256 fingerprint goes to
stderr: compare it with the status page's, or with a copy fetched from a node's `GET /api/ca.pem`.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

from aivailable.errors import ConfigError
from aivailable.gossip.tls import derive_ca
from aivailable.token_command import read_secret


def ca_command(args: argparse.Namespace) -> int:
    ca = derive_ca(read_secret(args.state_dir, args.cluster_secret_file).encode())
    if args.out:
        out = Path(args.out).expanduser()
        try:
            out.write_bytes(ca.pem)
        except OSError as exc:
            raise ConfigError(f"--out: cannot write {out}: {exc.strerror or exc}", param="--out") from None
        print(f"wrote the cluster CA certificate to {out}", file=sys.stderr)
    else:
        sys.stdout.write(ca.pem.decode())
    print(f"cluster CA sha256 fingerprint: {ca.fingerprint}", file=sys.stderr)
    return 0


def untrusted_hint(exc: BaseException) -> str:
    """A hint for CLI commands that could not reach an HTTPS node because its certificate is not trusted."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return ("; an HTTPS node whose CA this machine does not trust: run with SSL_CERT_FILE=ca.pem, the CA "
                "that `aivailable ca` prints (nodes with --tls auto)")
    return ""

"""`aivailable token`: print the join command of this node's cluster again.

The secret comes from the local state directory (or --cluster-secret-file); the address(es) from a running
node of the cluster (--url: its own address and up to a few live peers), or from --address.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from aivailable.errors import ConfigError
from aivailable.gossip.envelope import cluster_id_hash
from aivailable.gossip.secret import SECRET_FILE
from aivailable.jointoken import MAX_ADDRESSES, encode
from aivailable.paths import default_state_dir

SEEDS = 3
"""Addresses put in a token: the asked node first, then live peers, so a joiner finds the cluster even if
one of them is down."""


def seed_addresses(view: dict, limit: int = SEEDS) -> list[str]:
    """The asked node's address, then alive peers' (from a /api/cluster document)."""
    nodes = view.get("nodes") or []
    me = [n.get("address") for n in nodes if n.get("id") == view.get("node_id")]
    others = sorted(n.get("address") for n in nodes
                    if n.get("id") != view.get("node_id") and n.get("state") == "alive" and n.get("address"))
    return [a for a in dict.fromkeys([*me, *others]) if a][:limit]


def read_secret(state_dir: str | None, secret_file: str | None) -> str:
    path = Path(secret_file).expanduser() if secret_file else Path(state_dir or default_state_dir()).expanduser() / SECRET_FILE
    param = "--cluster-secret-file" if secret_file else "--state-dir"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{param}: no cluster secret at {path}; run this on a node of the cluster (or give "
                          "its --state-dir)", param=param) from None
    except OSError as exc:
        raise ConfigError(f"{param}: cannot read {path}: {exc.strerror or exc}", param=param) from None
    if not secret:
        raise ConfigError(f"{param}: the cluster secret file {path} is empty", param=param)
    return secret


def token_command(args: argparse.Namespace) -> int:
    secret = read_secret(args.state_dir, args.cluster_secret_file)
    addresses = list(args.address or [])
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--address {a!r}: expected HOST:PORT", param="--address")
    if not addresses:
        url = args.url.rstrip("/") + "/api/cluster"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                view = json.load(r)
            addresses = seed_addresses(view)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            from aivailable.ca_command import untrusted_hint

            print(f"aivailable token: cannot ask the node at {args.url} for its address ({exc}{untrusted_hint(exc)}); "
                  "is it running? Give --url of a running node or --address HOST:PORT", file=sys.stderr)
            return 1
        if view.get("cluster_id") not in (None, cluster_id_hash(secret)):
            print(f"aivailable token: the node at {args.url} belongs to another cluster than the secret read here "
                  "(give the --state-dir or --cluster-secret-file of that node)", file=sys.stderr)
            return 1
        if not addresses:
            print(f"aivailable token: the node at {args.url} reported no address; give --address HOST:PORT",
                  file=sys.stderr)
            return 1
    token = encode(addresses[:MAX_ADDRESSES], secret)
    print(token if args.token_only else f"aivailable up --join-token {token}")
    return 0

"""`aivailable drain`, `undrain` and `admin-key`: maintenance without dropped requests.

`drain` asks a node (POST /admin/drain) to take itself or one of its GPUs out of placement, then waits
(at most ``--timeout``) until nothing runs there any more, printing what still does; the node keeps
serving each replica until the model is ready elsewhere. The admin key comes from ``--admin-key``,
``--admin-key-file``, or is derived from the cluster secret on this machine (``--state-dir`` /
``--cluster-secret-file``), so on a node of the cluster no flag is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from aivailable import maintenance
from aivailable.errors import ConfigError, NodeError

WAIT_S = 600.0
POLL_S = 1.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `drain`, `undrain` and `admin-key` on the top-level parser."""
    for name, text in (("drain", "take a node or one of its GPUs out of placement; its models move first"),
                       ("undrain", "make a drained node or GPU placeable again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the node to (un)drain (default %(default)s)")
        p.add_argument("--gpu", metavar="ID", help="only this GPU of the node (its id as `aivailable status` shows)")
        key_args(p)
        if name == "drain":
            p.add_argument("--no-wait", action="store_true", help="return once the node accepted the drain")
            p.add_argument("--timeout", type=float, default=WAIT_S, metavar="SECONDS",
                           help="longest wait for the models to move (default %(default)s)")
    k = sub.add_parser("admin-key", help="print the cluster's admin key (for drain/undrain from another machine)")
    key_args(k, with_key=False)


def key_args(p: argparse.ArgumentParser, *, with_key: bool = True) -> None:
    """The admin-key flags (`--admin-key`, `--admin-key-file`, or derived: `--state-dir`, `--cluster-secret-file`)."""
    if with_key:
        p.add_argument("--admin-key", dest="admin_key", metavar="KEY", help="the cluster's admin key")
        p.add_argument("--admin-key-file", dest="admin_key_file", metavar="FILE", help="a file holding it")
    p.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                   help="derive the key from this node state directory's cluster secret (default: this machine's)")
    p.add_argument("--cluster-secret-file", dest="cluster_secret_file", metavar="FILE",
                   help="derive the key from this cluster secret file")


def resolve_key(args: argparse.Namespace) -> str:
    """The admin key from the flags, else derived from the local cluster secret (ConfigError naming the flag)."""
    if getattr(args, "admin_key", None) and getattr(args, "admin_key_file", None):
        raise ConfigError("give --admin-key or --admin-key-file, not both", param="--admin-key")
    if getattr(args, "admin_key", None):
        return args.admin_key.strip()
    if getattr(args, "admin_key_file", None):
        path = Path(args.admin_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--admin-key-file: cannot read {path}: {exc.strerror or exc}",
                              param="--admin-key-file") from None
        if not key:
            raise ConfigError(f"--admin-key-file: {path} is empty", param="--admin-key-file")
        return key
    from aivailable.token_command import read_secret

    return maintenance.admin_key(read_secret(args.state_dir, args.cluster_secret_file).encode())


def request_json(url: str, *, body: dict | None = None, key: str | None = None, method: str | None = None) -> dict:
    """Send an admin request (POST with `body`, else GET, unless `method`); NodeError with the node's message."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if body is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            msg = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = exc.reason
        raise NodeError(f"{url}: HTTP {exc.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        from aivailable.ca_command import untrusted_hint

        raise NodeError(f"--url: cannot reach {url}: {getattr(exc, 'reason', exc)}{untrusted_hint(exc)}") from None


def remaining(view: dict, node_id: str, gpu: str | None) -> list[str]:
    """`model on node:gpus (state)` of every replica still on the drained node (or GPU), from /api/cluster."""
    out = []
    for m in view.get("models") or []:
        for r in m.get("replicas") or []:
            if r.get("node") == node_id and (gpu is None or gpu in r.get("gpus", [])) and r.get("state") != "lost":
                out.append(f"{m['name']} on {node_id}:{'+'.join(r.get('gpus', []))} ({r.get('state')})")
    return sorted(out)


def drain_command(args: argparse.Namespace) -> int:
    if args.command == "admin-key":
        print(resolve_key(args))
        return 0
    key = resolve_key(args)
    base = args.url.rstrip("/")
    drained = args.command == "drain"
    state = request_json(f"{base}/admin/{args.command}", body={"gpu": args.gpu} if args.gpu else {}, key=key)
    node = state["node"]
    what = f"GPU {args.gpu} of node {node}" if args.gpu else f"node {node}"
    if not drained:
        print(f"{what} undrained: placement may use it again")
        return 0
    print(f"{what} drained: placement puts nothing new there; its models move to other GPUs first")
    if args.no_wait:
        return 0
    deadline, last = time.monotonic() + args.timeout, None
    while True:
        try:
            left = remaining(request_json(f"{base}/api/cluster", key=key), node, args.gpu)
        except NodeError as exc:  # a slow answer under load: try again until the deadline
            left = [f"(cannot read the cluster view: {exc.message})"]
        if not left:
            print(f"{what}: nothing runs there any more; safe for maintenance")
            return 0
        if left != last:
            print("waiting for: " + "; ".join(left), flush=True)
            last = left
        if time.monotonic() >= deadline:
            print(f"aivailable drain: still on {what} after {args.timeout:.0f} s: {'; '.join(left)} (no room "
                  "elsewhere, or no coordinator); it stays drained and keeps serving them", file=sys.stderr)
            return 1
        time.sleep(POLL_S)

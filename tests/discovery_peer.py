"""A tiny process for the network-namespace discovery test: announce with default interfaces, report peers.

    python -m tests.discovery_peer --node n1 --port 8001 --cluster HASH --expect n2 [--timeout 10]

Prints one JSON line ``{"node", "addr", "peers": {node: addr}, "ok"}`` and exits 0 once ``--expect`` was
found and ``--linger`` seconds have passed (so the other side can find it too), else 1 after
``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aivailable.gossip.discovery import Discovery


async def run(args: argparse.Namespace) -> int:
    d = Discovery(args.node, "0.0.0.0", args.port, args.cluster, None, lambda addr: None)
    await d.start()
    deadline = time.monotonic() + args.timeout
    try:
        while args.expect not in d.peers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ok, peers = args.expect in d.peers, dict(d.peers)
        if ok:
            await asyncio.sleep(args.linger)  # stay announced until the other side has found us too
    finally:
        await d.stop()
    print(json.dumps({"node": args.node, "addr": d.addr, "peers": peers, "ok": ok}), flush=True)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--expect", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--linger", type=float, default=2.0)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

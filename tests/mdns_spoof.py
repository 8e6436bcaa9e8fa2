"""A spoofer for the mDNS test: announce a record of a cluster (its id hash is public) pointing at an
address it owns, and count the cluster messages that arrive there: plain HTTP posts to PORT (answered 204,
as a real node would, for nodes with --insecure-cluster), and TLS connections to the cluster port PORT + 1
(a spoofer without the secret has no certificate, so it only counts them and hangs up).

    python -m tests.mdns_spoof --host 10.77.0.1 --port 9000 --cluster HASH --duration 30

Prints one JSON line ``{"posts": [seconds since start, ...]}`` after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aiohttp import web

from aivailable.gossip.discovery import Discovery


async def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    posts: list[float] = []

    async def gossip(request: web.Request) -> web.Response:
        await request.read()
        posts.append(round(time.monotonic() - t0, 3))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/_cluster/gossip", gossip)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()

    async def knock(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(1)
        if first == b"\x16":  # a TLS handshake record: a node pushing to what it thinks is a peer
            posts.append(round(time.monotonic() - t0, 3))
        writer.close()

    tls_port = await asyncio.start_server(knock, args.host, args.port + 1)
    fake = Discovery("aaa-fake", args.host, args.port, args.cluster, None, lambda addr: None)
    await fake.start()
    print("announced", flush=True)
    try:
        await asyncio.sleep(args.duration)
    finally:
        await fake.stop()
        tls_port.close()
        await runner.cleanup()
    print(json.dumps({"posts": posts}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cluster", required=True)
    p.add_argument("--duration", type=float, default=30.0)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

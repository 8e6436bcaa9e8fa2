"""`peer_post`: the one function that sends a signed request body to a peer node and reads its answer.

Key-set sync (aivailable/keysync.py) calls it. It builds the peer's URL from the address the peer gossips
and posts over a session the caller owns (the cluster's pooled peer session), so that switching
inter-node traffic to TLS changes this function and that session, not the callers.
"""

from __future__ import annotations

import aiohttp


def peer_url(address: str, path: str) -> str:
    """The URL of `path` on the node that gossips `address` (host:port)."""
    return f"http://{address}{path}"


async def peer_post(session: aiohttp.ClientSession, address: str, path: str, data: bytes, *,
                    timeout_s: float = 5.0, max_bytes: int = 1 << 20) -> tuple[int, bytes]:
    """POST `data` (a signed envelope) to `path` on the peer at `address`: (HTTP status, body). Raises
    aiohttp.ClientError or TimeoutError when the peer cannot be reached or answers too much."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(peer_url(address, path), data=data, timeout=timeout,
                            headers={"Content-Type": "application/octet-stream"}) as r:
        body = await r.content.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise aiohttp.ClientPayloadError(f"answer over {max_bytes} bytes")
        return r.status, body

"""Sans-IO state machine of one model-file transfer: which chunk from which peer, retries, resume.

The driver (`files/fetch.py`) feeds it what happened — the current holders (`set_peers`), a chunk's
bytes hashed (`on_data`), a failed request (`on_error`) — always with the time `now`, and asks
`next_requests(now)` what to request next. Nothing here reads a clock, sleeps or touches a socket, so a
seeded `random.Random` reproduces a whole transfer in the unit tests.

Rules:
- A chunk is complete once its bytes match the holder's manifest hash (`on_data`); the set of complete
  chunks is the resume bitmap (`bitmap()` / `TransferPlan(..., have=from_bitmap(...))`).
- A peer whose bytes do not match is banned for this transfer (`events` says so: the driver reports it)
  and the chunk goes back to the pool: it is fetched again from another peer.
- A request that fails (peer dead, timeout, HTTP error) puts the peer in exponential backoff; the chunk
  goes back to the pool.
- With no usable holder for `give_up_after_s` (all gone or banned) the transfer fails with a reason.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlanConfig:
    """Limits of one transfer."""

    max_inflight: int = 4
    """Chunk requests in flight at once (all peers together)."""
    max_inflight_per_peer: int = 2
    backoff_initial_s: float = 1.0
    """A peer whose request failed is not asked again for this long, doubling per consecutive failure."""
    backoff_max_s: float = 30.0
    give_up_after_s: float = 120.0
    """Fail when no usable holder has been known for this long."""


@dataclass
class PeerState:
    """What one transfer knows about one holder."""

    inflight: int = 0
    failures: int = 0
    retry_at: float = 0.0
    banned: str = ""
    """Why this peer is no longer asked (served corrupt bytes); empty while usable."""
    bytes: int = 0
    present: bool = True


@dataclass(frozen=True)
class Event:
    """Something the driver should log and count: kind is corrupt, error or failed."""

    kind: str
    peer: str
    text: str


@dataclass
class TransferPlan:
    """Which chunks of one file are complete, in flight or missing, and who to ask for the rest."""

    chunk_hashes: list[str]
    chunk_size: int
    size: int
    config: PlanConfig = field(default_factory=PlanConfig)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    have: set[int] = field(default_factory=set)
    peers: dict[str, PeerState] = field(default_factory=dict)
    inflight: dict[int, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    error: str = ""
    _no_peer_since: float | None = None

    def __post_init__(self) -> None:
        expected = max(1, -(-self.size // self.chunk_size))
        if len(self.chunk_hashes) != expected:
            raise ValueError(f"manifest has {len(self.chunk_hashes)} chunk hashes; a {self.size}-byte file in "
                             f"{self.chunk_size}-byte chunks has {expected}")
        self.have = {i for i in self.have if 0 <= i < expected}

    # -- queries -------------------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return len(self.chunk_hashes)

    @property
    def done(self) -> bool:
        return len(self.have) == self.n_chunks

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def bytes_done(self) -> int:
        return sum(self.chunk_len(i) for i in self.have)

    def usable(self, now: float) -> list[str]:
        """Present, not banned peers (in backoff or not)."""
        return sorted(p for p, s in self.peers.items() if s.present and not s.banned)

    def banned(self) -> dict[str, str]:
        return {p: s.banned for p, s in self.peers.items() if s.banned}

    def bitmap(self) -> bytes:
        """The complete chunks, one bit each (chunk i = bit i % 8 of byte i // 8)."""
        out = bytearray((self.n_chunks + 7) // 8)
        for i in self.have:
            out[i // 8] |= 1 << (i % 8)
        return bytes(out)

    # -- inputs --------------------------------------------------------------------------------------
    def set_peers(self, peers: Iterable[str], now: float) -> None:
        """The nodes that currently hold the file (live ones); a peer that left keeps its ban."""
        current = set(peers)
        for p in current - set(self.peers):
            self.peers[p] = PeerState()
        for p, s in self.peers.items():
            s.present = p in current
        self._check_stalled(now)

    def on_data(self, i: int, peer: str, sha256_hex: str, n_bytes: int, now: float) -> bool:
        """Chunk `i` arrived from `peer` with this hash; True if it is good (the driver keeps it)."""
        self._release(i, peer)
        s = self.peers.setdefault(peer, PeerState(present=False))
        if n_bytes != self.chunk_len(i) or sha256_hex != self.chunk_hashes[i]:
            s.banned = f"served corrupt data (chunk {i}: sha256 or length does not match the manifest)"
            self.events.append(Event("corrupt", peer, f"chunk {i} from {peer} failed verification; "
                                                      "re-fetching it from another holder"))
            self._check_stalled(now)
            return False
        s.failures, s.bytes = 0, s.bytes + n_bytes
        self.have.add(i)
        return True

    def on_error(self, i: int, peer: str, why: str, now: float) -> None:
        """The request for chunk `i` to `peer` failed (`why` is for the log)."""
        self._release(i, peer)
        s = self.peers.setdefault(peer, PeerState(present=False))
        s.failures += 1
        delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (s.failures - 1))
        s.retry_at = now + delay
        self.events.append(Event("error", peer, f"chunk {i} from {peer} failed ({why}); "
                                                f"not asking {peer} again for {delay:.0f}s"))
        self._check_stalled(now)

    def fail(self, why: str) -> None:
        """The driver gave up (e.g. the whole-file hash did not match)."""
        self.error = why
        self.events.append(Event("failed", "", why))

    def next_requests(self, now: float) -> list[tuple[int, str]]:
        """(chunk, peer) pairs to request now, lowest missing chunks first, spread over the least busy peers."""
        if self.failed or self.done:
            return []
        self._check_stalled(now)
        if self.failed:
            return []
        out: list[tuple[int, str]] = []
        missing = (i for i in range(self.n_chunks) if i not in self.have and i not in self.inflight)
        for i in missing:
            if len(self.inflight) >= self.config.max_inflight:
                break
            ready = [p for p in self.usable(now) if self.peers[p].retry_at <= now
                     and self.peers[p].inflight < self.config.max_inflight_per_peer]
            if not ready:
                break
            least = min(self.peers[p].inflight for p in ready)
            peer = self.rng.choice([p for p in ready if self.peers[p].inflight == least])
            self.inflight[i] = peer
            self.peers[peer].inflight += 1
            out.append((i, peer))
        return out

    def next_wakeup(self, now: float) -> float | None:
        """When a peer in backoff may be asked again (None: nothing to wait for)."""
        waits = [s.retry_at for p, s in self.peers.items() if s.present and not s.banned and s.retry_at > now]
        return min(waits) if waits else None

    def drain_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # -- internals -----------------------------------------------------------------------------------
    def _release(self, i: int, peer: str) -> None:
        if self.inflight.get(i) == peer:
            del self.inflight[i]
            if peer in self.peers:
                self.peers[peer].inflight = max(0, self.peers[peer].inflight - 1)

    def _check_stalled(self, now: float) -> None:
        if self.done or self.failed:
            return
        if self.usable(now) or self.inflight:
            self._no_peer_since = None
            return
        if self._no_peer_since is None:
            self._no_peer_since = now
        elif now - self._no_peer_since >= self.config.give_up_after_s:
            bad = self.banned()
            why = "no live node holds the file"
            if bad:
                why = "no usable holder left; not asking " + ", ".join(f"{p} ({b})" for p, b in sorted(bad.items()))
            self.fail(f"{why} (waited {self.config.give_up_after_s:.0f}s for another holder)")


def from_bitmap(data: bytes, n_chunks: int) -> set[int]:
    """The chunk indexes set in a `TransferPlan.bitmap()`."""
    return {i for i in range(min(n_chunks, len(data) * 8)) if data[i // 8] >> (i % 8) & 1}


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of a `size`-byte file (an empty file still has one, empty, chunk)."""
    return max(1, -(-size // chunk_size))

"""The node's state directory: checked before use, its node id read or created, and its disposable cache
recovered when damaged.

What lives there and what a fault does to it:

* ``node_id``, ``cluster/`` (election term, vote, voter set, last accepted placement) and
  ``cluster_secret``: a node must never forget these, so a directory that cannot be written, or a file
  that cannot be read, stops the node at start with :class:`StateDirError` (exit code 1) saying the path,
  the cause and what to do. Nothing is deleted or replaced automatically.
* ``cache/`` (GGUF metadata and VRAM estimates): safe to lose. A damaged one is moved aside to
  ``cache.corrupt-<unix time>`` and a fresh one is started, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sqlite3
import time
import uuid
from pathlib import Path

import diskcache

from aivailable.errors import NodeError

log = logging.getLogger("aivailable.node")

PROBE_BYTES = 64 * 1024
"""Written, fsynced and removed at start: room for a few hundred vote updates, so a nearly full disk is
refused at start rather than failing at the first election."""

_ADVICE = {
    errno.ENOSPC: "the filesystem is full: free space there (`df -h {path}`) or give --state-dir on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or give --state-dir on another disk",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write (check `dmesg` for disk errors) "
                 "or give --state-dir on a writable disk",
    errno.EACCES: "the node's user may not write there: fix the ownership (`chown`) or give another --state-dir",
    errno.EPERM: "the node's user may not write there: fix the ownership (`chown`) or give another --state-dir",
}


class StateDirError(NodeError):
    """The state directory cannot be used; the message says the path, the cause and what to do."""


def explain(path: Path, exc: OSError) -> str:
    """`path: cause; what to do` for an OSError met in the state directory."""
    cause = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno or 0, "check the disk and the path, or give another --state-dir")
    return f"{path}: {cause}; {advice.format(path=path)}"


def check_writable(state_dir: Path) -> None:
    """Create `state_dir` and prove it takes a small fsynced write; StateDirError otherwise."""
    probe = state_dir / f".write-probe-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StateDirError(f"cannot write the state directory {explain(state_dir, exc)}. The node keeps its "
                            "election term and vote there and will not run without it.") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _is_corrupt(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text)


def open_disposable_cache(path: Path) -> diskcache.Cache:
    """The node's cache of derived data; a damaged one is moved aside and replaced by an empty one."""
    try:
        cache = diskcache.Cache(str(path))
        cache.get("probe")  # a damaged page may only show on the first query
        return cache
    except Exception as exc:
        if not _is_corrupt(exc):
            if isinstance(exc, OSError):
                raise StateDirError(f"cannot open the node cache {explain(path, exc)}") from None
            raise StateDirError(f"cannot open the node cache {path}: {exc}") from None
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            path.rename(aside)
        except OSError as move_exc:
            raise StateDirError(f"the node cache {path} is damaged ({exc}) and cannot be moved aside: "
                                f"{explain(path, move_exc)}") from None
        log.warning("the node cache %s was damaged (%s); it holds only data that is safe to lose (GGUF "
                    "metadata, VRAM estimates), so it was moved to %s and a fresh one started; delete that "
                    "copy when you no longer need it", path, exc, aside)
        return diskcache.Cache(str(path))


def read_state_file(path: Path, what: str) -> str | None:
    """The text of the state file `path`, None when there is none; StateDirError naming `what` when it
    cannot be read."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateDirError(f"cannot read {what} {explain(path, exc)}") from None


def read_node_id(path: Path) -> str | None:
    """The persisted node id, None if there is none yet; StateDirError if it exists but is unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        cause = explain(path, exc) if isinstance(exc, OSError) else f"{path}: not text ({exc})"
        raise StateDirError(f"cannot read the node id {cause}") from None
    nid = text.strip()
    if not nid or not nid.isprintable() or len(nid) > 128 or any(c.isspace() for c in nid):
        raise StateDirError(
            f"the node id file {path} is damaged (content {text[:40]!r}). The node's election vote is stored "
            f"under that id, so it will not invent a new one: write the old id back into the file, or start "
            f"with --node-id ID (the old id as peers show it in `aivailable status`)")
    return nid


def load_node_id(state_dir: Path, configured: str | None = None) -> str:
    """This node's id: `configured` (--node-id) if given, else the persisted one, else a new one
    (hostname-xxxxxx), written whole before it is used. StateDirError where the file is unusable, or
    missing while ``cluster/`` holds a vote cast under the old id."""
    if configured:
        return configured
    path = state_dir / "node_id"
    nid = read_node_id(path)
    if nid is not None:
        return nid
    if (state_dir / "cluster").exists():
        raise StateDirError(
            f"{path} is missing but {state_dir / 'cluster'} holds an election vote cast under the old "
            "id; start with --node-id ID (the old id, as peers show it in `aivailable status`), or move "
            "the cluster directory aside to join as a new member")
    nid = f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    tmp = path.with_name(path.name + ".tmp")
    try:  # written whole or not at all
        with tmp.open("w") as f:
            f.write(nid + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise StateDirError(f"cannot write the node id {explain(path, exc)}") from None
    return nid

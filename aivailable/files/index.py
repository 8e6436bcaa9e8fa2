"""The model files this node holds: configured paths, `*.gguf` dropped into the models directory, and
files fetched from peers or Hugging Face (`MODELS_DIR/fetched/<sha256>.gguf`).

Hashing a multi-gigabyte file takes seconds to minutes, so each sha256 is cached in diskcache under
(path, size, mtime): a restart, or a rescan, hashes only new or changed files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aivailable.files import progress

log = logging.getLogger("aivailable.files")

FETCHED = "fetched"
Origin = Literal["config", "dropped", "fetched"]


@dataclass(frozen=True)
class LocalFile:
    """One complete model file on this node."""

    sha256: str
    path: Path
    size: int
    origin: Origin
    name: str
    """The configured model name, or the file name without `.gguf`."""


def sha256_file(path: Path, advance: progress.Advance | None = None, block: int = 1 << 20) -> str:
    """The file's sha256 (hex), read in `block`-byte pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(block):
            h.update(data)
            if advance is not None:
                advance(len(data))
    return h.hexdigest()


class FileIndex:
    """Scans the models directory and configured paths; hashes what the cache does not know yet."""

    def __init__(self, models_dir: Path, cache: Any, config_paths: dict[str, str]):
        self.models_dir = models_dir
        self.fetched_dir = models_dir / FETCHED
        self.cache = cache
        self.config_paths = config_paths
        self.fetched_dir.mkdir(parents=True, exist_ok=True)

    def cached_sha256(self, path: Path) -> str:
        """sha256 of `path`, from the cache when (path, size, mtime) has not changed."""
        st = path.stat()
        key = ("sha256", str(path.resolve()), st.st_size, st.st_mtime_ns)
        hit = self.cache.get(key)
        if hit is not None:
            return str(hit)
        log.info("hashing %s (%.1f MiB); the result is cached, restarts do not hash it again",
                 path, st.st_size / 2**20)
        with progress.bar(f"sha256 {path.name}", st.st_size) as adv:
            digest = sha256_file(path, adv)
        self.cache.set(key, digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record a hash computed elsewhere (a verified transfer), so the next scan does not redo it."""
        st = path.stat()
        self.cache.set(("sha256", str(path.resolve()), st.st_size, st.st_mtime_ns), digest)

    def scan(self) -> list[LocalFile]:
        """Every readable model file (blocking: run it in a thread); one sha256 may appear under several names."""
        found: list[LocalFile] = []
        entries: list[tuple[Path, Origin, str]] = [(Path(p).expanduser(), "config", n)
                                                   for n, p in sorted(self.config_paths.items())]
        configured = {p.resolve() for p, _, _ in entries if p.exists()}
        if self.models_dir.is_dir():
            entries += [(p, "dropped", p.stem) for p in sorted(self.models_dir.glob("*.gguf"))
                        if p.resolve() not in configured]
        entries += [(p, "fetched", p.stem) for p in sorted(self.fetched_dir.glob("*.gguf"))]
        for path, origin, name in entries:
            try:
                digest = self.cached_sha256(path)
                size = path.stat().st_size
            except OSError as exc:
                log.warning("cannot index model file %s: %s", path, exc.strerror or exc)
                continue
            if origin == "fetched" and digest != path.stem:  # damaged on disk since it was verified
                log.error("fetched file %s no longer matches its sha256 (%s); removing it", path, digest)
                path.unlink(missing_ok=True)
                continue
            found.append(LocalFile(digest, path, size, origin, name))
        return found


def gguf_defaults(path: Path, cache: Any) -> dict:
    """Catalog defaults of a dropped-in file from its GGUF metadata (cached): ctx and embedding."""
    from aivailable.engine.gguf_info import read_model_info

    st = path.stat()
    key = ("gguf-defaults", str(path.resolve()), st.st_size, st.st_mtime_ns)
    hit = cache.get(key)
    if hit is not None:
        return dict(hit)
    info = read_model_info(path)
    ctx = min(4096, info.context_length) if info.context_length else 4096
    out = {"ctx": max(64, ctx), "embedding": info.pooling_type not in (None, 0)}
    cache.set(key, out)
    return out

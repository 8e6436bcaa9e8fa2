"""The cluster secret file: load it, or create a random one (mode 0600) on a node's first start."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from aivailable.errors import ConfigError

__all__ = ["MIN_SECRET_CHARS", "SECRET_FILE", "join_instructions", "load_or_create_secret"]

log = logging.getLogger("aivailable.cluster")

SECRET_FILE = "cluster_secret"
MIN_SECRET_CHARS = 16  # shorter secrets can be guessed offline from the cluster id hash mDNS announces


def load_or_create_secret(
    state_dir: Path | str, secret: str | None = None, secret_file: str | Path | None = None
) -> tuple[bytes, bool]:
    """The cluster secret: ``secret`` (flag) or ``secret_file`` wins; else ``state_dir/cluster_secret``;
    else a new random one stored there with mode 0600. Returns ``(secret, created)``; when created, show
    the operator :func:`join_instructions`. The secret itself is never logged."""
    if secret is not None and secret_file is not None:
        raise ConfigError("give --cluster-secret or --cluster-secret-file, not both", param="cluster_secret")
    if secret is not None:
        return _checked(secret, "cluster_secret", "--cluster-secret"), False
    if secret_file is not None:
        path = Path(secret_file).expanduser()
        return _checked(_read_secret(path, "cluster_secret_file"), "cluster_secret_file", str(path)), False
    path = Path(state_dir).expanduser() / SECRET_FILE
    if path.exists():
        return _checked(_read_secret(path, "state_dir"), "state_dir", str(path)), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (value + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileExistsError:  # another process created it meanwhile: use theirs
        return _checked(_read_secret(path, "state_dir"), "state_dir", str(path)), False
    except OSError as exc:
        raise ConfigError(f"cannot create the cluster secret file {path}: {exc}", param="state_dir") from exc
    log.info("created a new cluster secret in %s (mode 0600)", path)
    return value.encode(), True


def join_instructions(advertise: str, state_dir: Path | str) -> str:
    """What to tell the operator after :func:`load_or_create_secret` created a secret."""
    path = Path(state_dir).expanduser() / SECRET_FILE
    return (
        f"Created a new cluster secret in {path}. To add another machine, copy that file to it "
        f"(keep it private: mode 0600) and run there:\n"
        f"  aivailable up --join {advertise} --cluster-secret-file {path}"
    )


def _read_secret(path: Path, param: str) -> str:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret file {path}: {exc}", param=param) from exc
    if mode & 0o077:
        log.warning(
            "the cluster secret file %s is readable by other users (mode %o); chmod 600 it",
            path,
            mode & 0o777,
        )
    return text


def _checked(value: str, param: str, where: str) -> bytes:
    value = value.strip()
    if not value:
        raise ConfigError(f"the cluster secret from {where} is empty", param=param)
    if len(value) < MIN_SECRET_CHARS:
        log.warning(
            "the cluster secret from %s is short (%d characters): mDNS announces a hash of it, so it can "
            "be guessed offline; use 32 or more random characters",
            where,
            len(value),
        )
    return value.encode()

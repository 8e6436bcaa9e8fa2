"""Join tokens: a cluster's seed address(es) and secret in one string, for `aivailable up --join-token`.

Format: ``aiv1:<payload>:<check>``, where payload is base64url (no padding) of the JSON
``{"a": ["host:port", ...], "s": "<secret>"}`` and check is the first 8 hex digits of the payload's
sha256. The check turns a truncated or mistyped paste into a clear error instead of a node that silently
forms a cluster of its own. The token carries the secret: treat it like the secret file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from aivailable.errors import ConfigError
from aivailable.gossip.secret import SECRET_FILE

PREFIX = "aiv1"
MAX_ADDRESSES = 8


def _check(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def encode(addresses: list[str], secret: str) -> str:
    """The join token for seeds `addresses` (host:port) and the cluster `secret`."""
    if not addresses:
        raise ValueError("a join token needs at least one address")
    body = json.dumps({"a": list(addresses)[:MAX_ADDRESSES], "s": secret}, separators=(",", ":"))
    payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
    return f"{PREFIX}:{payload}:{_check(payload)}"


def decode(token: str, param: str = "join_token") -> tuple[list[str], str]:
    """(addresses, secret) of a join token; ConfigError saying what is wrong with a bad one."""
    token = "".join(token.split())  # a paste wrapped over lines
    parts = token.split(":")
    if parts[0] != PREFIX:
        raise ConfigError(f"{param}: not an aivailable join token (it must start with {PREFIX}:); "
                          "print one with `aivailable token` on a node of the cluster", param=param)
    if len(parts) != 3 or len(parts[2]) != 8:
        raise ConfigError(f"{param}: the join token is incomplete (was it cut off when copied?); copy the "
                          "whole token, or print it again with `aivailable token`", param=param)
    payload, check = parts[1], parts[2]
    if _check(payload) != check.lower():
        raise ConfigError(f"{param}: the join token's checksum does not match (a character was lost or "
                          "changed when copied); copy the whole token again", param=param)
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        addresses, secret = data["a"], data["s"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ConfigError(f"{param}: the join token is damaged (its content cannot be read)", param=param) from None
    if (not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses)
            or not isinstance(secret, str) or not secret.strip()):
        raise ConfigError(f"{param}: the join token is damaged (no address or no secret in it)", param=param)
    return addresses, secret


def join_command(addresses: list[str], secret: str) -> str:
    return f"aivailable up --join-token {encode(addresses, secret)}"


def startup_message(advertise: str, secret: bytes, state_dir: Path | str) -> str:
    """What the first node of a new cluster prints: one command to run on every other machine."""
    path = Path(state_dir).expanduser() / SECRET_FILE
    return (f"Created a new cluster secret in {path}. To add another machine, run there (the token carries "
            f"this node's address and the secret: keep it private):\n"
            f"  {join_command([advertise], secret.decode())}\n"
            f"`aivailable token` prints it again.")


def adopt(state_dir: Path, secret: str, param: str = "join_token") -> None:
    """Keep the token's secret in the state directory, so the node rejoins after a restart without the
    token. A different secret already there is an error: this node belongs to another cluster."""
    path = state_dir / SECRET_FILE
    try:
        current = path.read_text().strip()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise ConfigError(f"{param}: cannot read {path}: {exc}", param=param) from None
    if current is not None:
        if current != secret:
            raise ConfigError(f"{param}: this node's state directory already holds the secret of another cluster "
                              f"({path}); to move this node to the token's cluster, remove that file (and its "
                              f"cluster/ folder) first", param=param)
        return
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    except OSError as exc:
        raise ConfigError(f"{param}: cannot write the cluster secret to {path}: {exc}", param=param) from None


def apply(settings, param: str = "--join-token"):
    """Settings with the join token (if any) turned into seeds and the state directory's secret."""
    node = settings.node
    if not node.join_token:
        return settings
    if node.cluster_secret is not None or node.cluster_secret_file is not None:
        raise ConfigError(f"{param}: the token carries the cluster secret; give it or --cluster-secret(-file), "
                          "not both", param=param)
    addresses, secret = decode(node.join_token, param)
    adopt(node.state_path, secret, param)
    join = list(dict.fromkeys([*node.join, *addresses]))
    return settings.model_copy(update={"node": node.model_copy(update={"join": join})})

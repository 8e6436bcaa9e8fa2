"""What names and hashes may look like wherever they enter a node (config, flags, dropped files, gossip).

- A **model name** is 1-128 characters: ASCII letters, digits and `. _ - : / +`, starting with a letter or
  digit (`llama-3.1-8b-q4_k_m`, `org/model:q8_0`). No spaces, quotes, `<`, `>` or control characters, so
  a name is safe in a URL path segment's neighbourhood, a log line, a Prometheus label and the status page.
- A **sha256** is exactly 64 lowercase hexadecimal characters; it is also a file name under the models
  directory, so nothing else may ever be used as one.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_NAME_RULE = "1-128 characters of letters, digits, '.', '_', '-', ':', '/' or '+', starting with a letter or digit"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_model_name(name: object) -> bool:
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None


def is_sha256(value: object) -> bool:
    """True for exactly 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def inside(base: Path, path: Path) -> Path:
    """`path` resolved (symlinks followed); ValueError if that is not inside `base` (also resolved)."""
    resolved, root = path.resolve(), base.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path} resolves to {resolved}, outside {root}")
    return resolved

"""The key set in the node's state directory: `STATE_DIR/api_keys.json`, mode 0600, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from aivailable.apikeys.keyset import KeySet, RecordError
from aivailable.statedir import StateDirError, explain, read_state_file

KEYS_FILE = "api_keys.json"


def load(path: Path) -> KeySet:
    """The key set kept at `path`; empty when there is no file. StateDirError for an unreadable one."""
    text = read_state_file(path, "the API key set")
    if text is None:
        return KeySet()
    try:
        return KeySet.from_list(json.loads(text).get("records"))
    except (ValueError, AttributeError, RecordError) as exc:
        raise StateDirError(f"{path}: unreadable API key set ({exc}); restore it, or delete it and this node "
                            "gets the set from its peers") from None


def save(path: Path, ks: KeySet) -> None:
    """Write `ks` whole or not at all (temporary file, fsync, rename), readable by this user only."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "records": ks.to_list()}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    except OSError as exc:
        raise StateDirError(f"cannot write the API key set {explain(path, exc)}") from None

"""Hugging Face downloads (`source = "hf://OWNER/REPO/FILE.gguf"`) through `huggingface_hub`.

Used by the node that defines such a model, at startup, when it does not hold the file yet: the file
goes to `MODELS_DIR/fetched/<sha256>.gguf` like a peer transfer, so the disk budget and gossip treat
it the same way. `endpoint` defaults to huggingface_hub's own (HF_ENDPOINT); tests point it at a local
HTTP server speaking the same protocol.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from aivailable.files.index import sha256_file

log = logging.getLogger("aivailable.files")


def parse_source(source: str) -> tuple[str, str]:
    """`hf://OWNER/REPO/PATH/FILE.gguf` -> ("OWNER/REPO", "PATH/FILE.gguf")."""
    rest = source.removeprefix("hf://")
    parts = rest.split("/", 2)
    if not source.startswith("hf://") or len(parts) != 3 or not all(parts):
        raise ValueError(f"{source!r} is not hf://OWNER/REPO/FILE.gguf")
    return f"{parts[0]}/{parts[1]}", parts[2]


def download(source: str, fetched_dir: Path, *, expected_sha256: str | None = None, endpoint: str | None = None,
             token: str | None = None) -> tuple[Path, str]:
    """Download `source` (blocking), verify it, and move it to `fetched_dir/<sha256>.gguf`.

    Returns (path, sha256). Raises ValueError when the file does not match `expected_sha256` (the
    download is deleted), and huggingface_hub's errors for network or repository problems."""
    from huggingface_hub import hf_hub_download

    repo, filename = parse_source(source)
    staging = fetched_dir / ".hf-staging"
    staging.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from Hugging Face repository %s", filename, repo)
    got = Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=staging, endpoint=endpoint, token=token))
    digest = sha256_file(got)
    if expected_sha256 and digest != expected_sha256:
        got.unlink(missing_ok=True)
        raise ValueError(f"{source} hashes to {digest}, but the catalog says sha256 = {expected_sha256}; deleted")
    final = fetched_dir / f"{digest}.gguf"
    os.replace(got, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final, digest

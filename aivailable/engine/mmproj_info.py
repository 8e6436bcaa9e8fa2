"""Device memory of a multimodal projector (mmproj GGUF), from its header, before llama.cpp loads it.

libmtmd puts the projector's weights on the model's GPU and allocates one compute buffer for encoding an
image. The buffer's peak is the vision transformer's attention over all patches of one image (llama.cpp
without flash attention keeps the n_patches x n_patches scores of every head in f32) plus a few
activations of n_patches x max(n_embd, n_ff). Projectors of dynamic resolution are sized by their
largest image (`clip.vision.image_max_pixels`) when they declare one, else by `image_size`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivailable.engine.estimate import MIB, SAFETY_MARGIN
from aivailable.engine.gguf_info import GGUFError, _Header

ACTIVATIONS_WIDE = 8
"""f32 activations of n_patches x width alive at the vision graph's peak besides the attention scores
(residual, normed input, Q, K, V, attention output, FFN up, FFN out)."""


@dataclass(frozen=True)
class ProjectorInfo:
    projector_type: str
    weight_bytes: int
    n_embd: int
    n_ff: int
    n_head: int
    n_patches: int

    def compute_bytes(self) -> int:
        scores = self.n_patches * self.n_patches * self.n_head * 4
        return scores + ACTIVATIONS_WIDE * self.n_patches * max(self.n_embd, self.n_ff) * 4

    def total_mib(self) -> float:
        """What loading the projector and encoding one image add to a replica, with the safety margin."""
        return (self.weight_bytes + self.compute_bytes()) * (1 + SAFETY_MARGIN) / MIB


def read_projector_info(path: str | os.PathLike[str]) -> ProjectorInfo:
    """Read an mmproj GGUF header; GGUFError names the path when it is not a vision projector."""
    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, tensors = _Header(buf, path).parse()
    except (OSError, ValueError) as exc:
        raise GGUFError(path, getattr(exc, "strerror", None) or str(exc)) from exc
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder", True):
        raise GGUFError(path, "not a multimodal projector (general.architecture is not 'clip' or it has no "
                              "vision encoder)")

    def u(key: str, default: int = 0) -> int:
        v = meta.get(key, default)
        return int(v) if isinstance(v, (int, float)) else default

    patch = max(1, u("clip.vision.patch_size", 14))
    max_pixels = u("clip.vision.image_max_pixels")
    side_pixels = max_pixels if max_pixels else u("clip.vision.image_size", 224) ** 2
    return ProjectorInfo(
        projector_type=str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "unknown"),
        weight_bytes=sum(t.n_bytes for t in tensors.values()),
        n_embd=u("clip.vision.embedding_length"), n_ff=u("clip.vision.feed_forward_length"),
        n_head=max(1, u("clip.vision.attention.head_count", 1)), n_patches=max(1, side_pixels // (patch * patch)))


def projector_mib(entry: Mapping[str, Any], path: str | os.PathLike[str] | None) -> float:
    """MiB catalog model `entry`'s projector adds to a replica: 0 without one; from the file's header when
    this node holds it (`path`), else its gossiped size (weights only) until the file is here."""
    if not (entry.get("mmproj") or entry.get("mmproj_sha256") or entry.get("mmproj_source")):
        return 0.0
    if path is not None:
        return read_projector_info(path).total_mib()
    return float(entry.get("mmproj_size") or 0) * (1 + SAFETY_MARGIN) / MIB


def is_projector(path: str | os.PathLike[str]) -> bool:
    """True for a readable GGUF whose architecture is `clip` (a multimodal projector, not a model)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta, _ = _Header(buf, Path(path)).parse()
    except (OSError, ValueError):
        return False
    return meta.get("general.architecture") == "clip"

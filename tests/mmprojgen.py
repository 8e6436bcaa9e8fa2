"""Write a small but real multimodal projector GGUF (llama.cpp `--mmproj`) with the `gguf` package.

It is a Gemma 3 style projector (`clip.projector_type = gemma3`: a SigLIP vision transformer, average
pooling, RMS norm, linear projection into the text model's embedding space) with random (seeded) weights
and tiny dimensions, so llama.cpp's multimodal library (libmtmd) loads it and encodes images with it on a
CPU in milliseconds. Its output width must match the text model's embedding size (640 for the demo
Gemma 3 270M). What the model then says about an image is noise; the plumbing is real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_tokens(image_size: int, patch_size: int, merge: int) -> int:
    """Embeddings one image becomes: (patches per side / pooling kernel) squared."""
    side = image_size // patch_size // merge
    return side * side


def write_mmproj(path: str | Path, *, n_embd_text: int = 640, n_embd: int = 32, n_ff: int = 64, n_head: int = 2,
                 n_layers: int = 1, image_size: int = 64, patch_size: int = 8, merge: int = 2,
                 proj_scale: float = 0.02, seed: int = 0) -> Path:
    """Write the projector to `path`; it yields `image_tokens(image_size, patch_size, merge)` per image.
    `proj_scale`: standard deviation of the output projection (larger: images sway the model more)."""
    import gguf

    if image_size % (patch_size * merge):
        raise ValueError("image_size must be a multiple of patch_size * merge")
    rng = np.random.default_rng(seed)
    path = Path(path)
    w = gguf.GGUFWriter(path, "clip")
    w.add_name("test-gemma3-mmproj")
    w.add_file_type(0)  # all f32
    w.add_string("clip.projector_type", "gemma3")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", n_layers)
    w.add_uint32("clip.vision.projection_dim", n_embd_text)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.projector.scale_factor", merge)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def t(name: str, *shape: int, scale: float = 0.02, value: float | None = None) -> None:
        data = (np.full(shape, value) if value is not None else rng.standard_normal(shape) * scale)
        w.add_tensor(name, data.astype(np.float32))

    n_patches = (image_size // patch_size) ** 2
    t("v.patch_embd.weight", n_embd, 3, patch_size, patch_size)
    t("v.patch_embd.bias", n_embd, value=0.0)
    t("v.position_embd.weight", n_patches, n_embd)
    for i in range(n_layers):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t(f"v.blk.{i}.{proj}.weight", n_embd, n_embd)
            t(f"v.blk.{i}.{proj}.bias", n_embd, value=0.0)
        for ln in ("ln1", "ln2"):
            t(f"v.blk.{i}.{ln}.weight", n_embd, value=1.0)
            t(f"v.blk.{i}.{ln}.bias", n_embd, value=0.0)
        t(f"v.blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"v.blk.{i}.ffn_up.bias", n_ff, value=0.0)
        t(f"v.blk.{i}.ffn_down.weight", n_embd, n_ff)
        t(f"v.blk.{i}.ffn_down.bias", n_embd, value=0.0)
    t("v.post_ln.weight", n_embd, value=1.0)
    t("v.post_ln.bias", n_embd, value=0.0)
    t("mm.input_projection.weight", n_embd, n_embd_text, scale=proj_scale)
    t("mm.soft_emb_norm.weight", n_embd, value=1.0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def png(width: int = 48, height: int = 40, seed: int = 0) -> bytes:
    """A small RGB PNG (random pixels), written with zlib only."""
    import struct
    import zlib

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

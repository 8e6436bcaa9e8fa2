"""Images into a generation context with llama.cpp's multimodal library (libmtmd, `llama_cpp.mtmd_cpp`).

A model configured with `mmproj` gets a `Projector` next to its weights. A chat prompt with images is
tokenized as usual (control tokens only from the template, engine/prompt.py), except that each image
becomes the projector's own items: the text tokens it wraps the image in (Gemma 3:
`<start_of_image>` ... `<end_of_image>`) and one `MediaChunk` that stands for `n_tokens` positions. In
the prompt's token list those positions hold the image's *pseudo-token*, a negative number derived from
the image's sha256: no vocabulary token is negative, so the batch engine's prefix cache can never take
one image's KV for another's (and it never reuses a slot's cache past an image at all; engine/batch.py).

The batch engine feeds a prompt's text in chunks as before and, at an image's position, calls `evaluate`
(mtmd encodes the image and decodes its embeddings into that sequence's KV). Projectors whose decoder
uses M-RoPE positions (Qwen2-VL family: an image spans fewer positions than embeddings) are refused at
load: the engine counts one position per prompt item.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import weakref
from dataclasses import dataclass, field

log = logging.getLogger("aivailable.media")

IMAGE_MARK_OPEN, IMAGE_MARK_CLOSE = "\ue002", "\ue003"
"""Around `NONCE:K` in a message's text: where image K of the request goes (engine/chatplan.py)."""


class ProjectorError(RuntimeError):
    """The projector cannot be loaded or cannot take this image; the message says why."""


@dataclass(eq=False)
class MediaChunk:
    """One image, tokenized by the projector: an owned mtmd chunk of `n_tokens` positions."""

    handle: int
    n_tokens: int
    pseudo_token: int
    _free: object = field(default=None, repr=False)


def pseudo_token(digest: str) -> int:
    """The negative stand-in token of an image with sha256 `digest` (hex)."""
    return -1 - int(digest[:15], 16) % (2**31 - 2)


def image_mark(nonce: str, k: int) -> str:
    return f"{IMAGE_MARK_OPEN}{nonce}:{k}{IMAGE_MARK_CLOSE}"


def split_marks(text: str, nonce: str) -> list[str | int]:
    """`text` cut at this request's image marks: strings and image indexes, in order (empty strings dropped)."""
    out: list[str | int] = []
    opener = f"{IMAGE_MARK_OPEN}{nonce}:"
    pos = 0
    while True:
        i = text.find(opener, pos)
        j = text.find(IMAGE_MARK_CLOSE, i + len(opener)) if i >= 0 else -1
        digits = text[i + len(opener):j] if j >= 0 else ""
        if i < 0 or j < 0 or not digits.isdigit():
            if text[pos:]:
                out.append(text[pos:])
            return out
        if i > pos:
            out.append(text[pos:i])
        out.append(int(digits))
        pos = j + 1


class Projector:
    """A loaded mmproj file bound to one text model. Tokenizing may run on any thread; `evaluate` only on
    the thread that owns the generation context."""

    def __init__(self, path: str, model, *, use_gpu: bool, n_threads: int):
        """`model` is llama-cpp-python's internals.LlamaModel of the text model."""
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        _quiet(mtmd_cpp)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        self._ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), model.model, params)
        if not self._ctx:
            raise ProjectorError(f"llama.cpp could not load the multimodal projector {path} for this model (not an "
                                 "mmproj GGUF, or made for a model of another embedding size; the worker log says why)")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise ProjectorError(f"the projector {path} has no vision encoder (audio-only projectors are not supported)")
        if mtmd_cpp.mtmd_decode_use_mrope(self._ctx):
            self.close()
            raise ProjectorError(f"the projector {path} needs M-RoPE positions (Qwen2-VL family), which this server "
                                 "does not support yet")
        self.marker = mtmd_cpp.mtmd_default_marker()

    def close(self) -> None:
        if self._ctx:
            self._m.mtmd_free(self._ctx)
            self._ctx = None

    def image_items(self, data: bytes) -> list[int | MediaChunk]:
        """The prompt items of one image: the projector's wrapping text tokens and the image chunk."""
        m = self._m
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = m.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(data), False)
        if not bitmap:
            raise ProjectorError("the image could not be decoded")
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text(self.marker, len(self.marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise ProjectorError(f"the projector could not tokenize the image (mtmd_tokenize returned {rc})")
            pseudo = pseudo_token(hashlib.sha256(data).hexdigest())
            items: list[int | MediaChunk] = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                kind = m.mtmd_input_chunk_get_type(chunk)
                if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    toks = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    items.extend(int(t) for t in toks[:n.value])
                elif kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    own = m.mtmd_input_chunk_copy(chunk)
                    n_tokens = int(m.mtmd_input_chunk_get_n_tokens(own))
                    mc = MediaChunk(own, n_tokens, pseudo)
                    mc._free = weakref.finalize(mc, m.mtmd_input_chunk_free, own)
                    items.append(mc)
                else:
                    raise ProjectorError("the projector produced a non-image chunk for an image")
            return items
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def evaluate(self, chunk: MediaChunk, lctx, n_past: int, seq_id: int, n_batch: int) -> int:
        """Encode the image and decode its embeddings into sequence `seq_id` from position `n_past`; returns
        the position after it. Raises ProjectorError when llama.cpp fails."""
        from llama_cpp import llama_cpp as lc

        new_past = lc.llama_pos(0)
        rc = self._m.mtmd_helper_eval_chunk_single(self._ctx, lctx, chunk.handle, n_past, seq_id, n_batch, False,
                                                   ctypes.byref(new_past))
        if rc != 0:
            raise ProjectorError(f"evaluating an image failed (mtmd returned {rc})")
        return int(new_past.value)


@dataclass
class MediaPrompt:
    """A prompt with images: `tokens` (pseudo-tokens at image positions) and the chunks by start position."""

    tokens: list[int]
    media: dict[int, MediaChunk]

    @classmethod
    def of(cls, items: list[int | MediaChunk]) -> MediaPrompt:
        tokens: list[int] = []
        media: dict[int, MediaChunk] = {}
        for it in items:
            if isinstance(it, MediaChunk):
                media[len(tokens)] = it
                tokens.extend([it.pseudo_token] * it.n_tokens)
            else:
                tokens.append(it)
        return cls(tokens, media)


_LOG_CB = None


def _quiet(mtmd_cpp) -> None:
    """Route libmtmd's log to Python logging: warnings and errors only (it prints every image at info)."""
    global _LOG_CB
    if _LOG_CB is not None:
        return
    from llama_cpp import llama_cpp as lc

    from aivailable.engine.loadlog import LOG_ERROR, LOG_WARN

    @lc.llama_log_callback
    def _cb(level, text, _user):
        if level in (LOG_WARN, LOG_ERROR) and text:
            log.log(logging.WARNING if level == LOG_WARN else logging.ERROR, "mtmd: %s",
                    text.decode("utf-8", "replace").rstrip())

    _LOG_CB = _cb
    mtmd_cpp.mtmd_log_set(_cb, None)
    mtmd_cpp.mtmd_helper_log_set(_cb, None)

"""Continuous batching: one llama.cpp context generating for up to `parallel` requests at once.

A `BatchEngine` owns one llama_context with `n_seq_max = parallel` and a scheduler loop on ONE
thread of its own. Requests come in through `submit()` (from any thread) and leave through a
`concurrent.futures.Future[GenResult]`; text goes out through each request's `emit` callback, called
on the engine thread. Only that thread touches the context, the batch and the samplers (tokenizing
needs only the vocabulary and may happen elsewhere).

Slots and context. Each slot is a llama.cpp sequence id with its own KV stream (the default,
non-unified cache). As in llama.cpp's server, the total context is split evenly:
`n_ctx_seq = n_ctx / parallel`, rounded up to 256 cells by llama.cpp (`llama_n_ctx_seq`); a
request's prompt plus completion must fit in `n_ctx_seq` tokens, and the KV cache holds
`n_ctx_seq * parallel` cells, which is what engine.estimate's `kv_layout(n_parallel=...)` counts.

One turn of the loop:
1. admit waiting requests into free slots, in arrival order;
2. end cancelled requests (client gone);
3. feed prompts: the next chunk of each admitted prompt, oldest first, about `prompt_chunk`
   tokens per turn in all, each chunk in a llama_decode of its own; a long prompt thus delays the
   running streams by one chunk per token they generate, never by the whole prompt;
4. one llama_decode with the last sampled token of every generating sequence, in slot order
   (llama.cpp cuts a multi-stream batch into ubatches of consecutive sequence ids);
5. after each llama_decode, sample each sequence that got logits with its own native sampler chain
   (engine/sampling.py: repetition penalties, the JSON grammar, then greedy at temperature 0, else
   top-k, top-p, min-p, temperature, dist(seed): the chain `Llama.generate` builds), detokenize
   incrementally and cut stop strings as engine.textstop does, and finish on end-of-generation, a stop
   string, max_tokens or the slot's context.

Images (models with an mmproj, engine/media.py): a prompt's image positions hold a negative pseudo-token
derived from the image's sha256, and step 3 feeds an image as one unit (libmtmd encodes it and decodes its
embeddings into the slot) and text only up to the next image. A slot's cached prefix is reused only up to
the first image of either prompt, so KV computed for one image is never taken for another.

Why prompts go alone, in fixed chunks: llama.cpp's numbers depend on how a sequence's tokens are
grouped into batches (the KV of a prompt fed in one piece differs in the last bits from the same
prompt fed in two). A prompt is therefore always fed in chunks that start at multiples of
`prompt_chunk`, never mixed with other sequences, and a slot's cached KV (kept after a request
ends, like llama-server's prompt cache) is reused for a new prompt only in whole chunks. Then a
request's prompt is computed bit for bit the same whatever else runs. Decode steps batch the
sequences together; there each sequence is one row of the matrix products, which the CPU kernels
compute the same as alone for up to 3 rows (repacked Q4_K weights switch to a different "gemm"
kernel from 4 rows up, which may flip a near-tie at temperature 0).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from aivailable.engine.latency import token_gaps
from aivailable.engine.logprobs import token_entry
from aivailable.engine.runner import GenParams, GenResult
from aivailable.engine.sampling import Sampler, Samplers
from aivailable.engine.textstop import TextStops
from aivailable.errors import InvalidRequest

log = logging.getLogger("aivailable.batch")

# Prompt tokens fed per turn of the loop, and the size of every prompt chunk: a turn costs the
# generating streams one token of latency, so a long prompt stalls them one chunk at a time. Also
# the granularity at which a cached prompt prefix is reused (see the module docstring).
PROMPT_CHUNK = 256


class EngineError(RuntimeError):
    """llama_decode failed; every request in that step gets this error."""


@dataclass(eq=False)
class _Job:
    tokens: list[int]
    params: GenParams
    cancel: threading.Event
    emit: Callable[..., None]
    future: Future
    t0: float
    sampler: Sampler | None = None
    media: dict | None = None
    """Images by start position (engine/media.py): `tokens` holds their pseudo-tokens there."""

    def first_media(self) -> int:
        """Position of the first image (len(tokens) without images): no cache is reused past it."""
        return min(self.media) if self.media else len(self.tokens)


@dataclass(eq=False)
class _Seq:
    """A request in a slot: `history` = prompt + sampled tokens; the first `n_past` are in the KV cache."""

    job: _Job
    slot: int
    history: list[int]
    n_past: int
    limit: int
    sampler: Sampler | None  # None for plain greedy
    text: TextStops
    n_out: int = 0
    ttft: float = 0.0
    out_index: int = -1
    cached: int = 0
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled
    pending_lp: list = field(default_factory=list)
    prompt_lp: list | None = None
    prompt_outputs: list = field(default_factory=list)  # (batch index, prompt position) to score


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot's stream holds
    aligned: int = 0  # of those, the prompt tokens computed as whole chunks (reusable, see _reusable)
    seq: _Seq | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchEngine:
    """Generation for one loaded model, `parallel` sequences at a time, on one scheduler thread."""

    def __init__(self, model, *, n_ctx: int, parallel: int, n_batch: int, n_threads: int,
                 prompt_chunk: int = PROMPT_CHUNK, kv_cache_type: str = "f16"):
        """`model` is llama-cpp-python's internals.LlamaModel (`Llama._model`); the context is ours.

        `kv_cache_type` (engine/kvcache.py) sets type_k and type_v. A quantized type asks for flash
        attention ("auto"): llama.cpp turns it on, as a quantized V cache requires, without checking that
        the GPU backend runs it with these types; Runner checks that afterwards (kvcache.attention_left_device)
        and refuses rather than let attention run on the CPU. A model llama.cpp cannot give the type (head
        size not a block multiple) fails here; Runner explains it (kvcache.kv_refusal)."""
        import llama_cpp
        from llama_cpp import _internals

        from aivailable.engine import kvcache

        self._lc = llama_cpp
        self.parallel = parallel
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = max(min(n_batch, n_ctx), parallel)
        cp.n_ubatch = min(cp.n_batch, 512)  # llama-cpp-python's default n_ubatch
        cp.n_seq_max = parallel
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.embeddings = False
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama(flash_attn=False)
        cp.type_k = cp.type_v = kvcache.ggml_id(kv_cache_type)
        if kvcache.needs_flash_attn(kv_cache_type):
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        self.kv_cache_type = kv_cache_type
        self._model = model
        self._context = _internals.LlamaContext(model=model, params=cp, verbose=False)
        self._ctx = self._context.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_batch = cp.n_batch
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._ctx)
        self.prompt_chunk = max(1, min(prompt_chunk, self.n_batch))
        self._vocab = model.vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._samplers = Samplers(llama_cpp, self._ctx, self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.projector = None  # engine.media.Projector, set by the runner for a model with an mmproj
        self._slots = [_Slot(i) for i in range(parallel)]
        self._active: list[_Seq] = []  # in admission order
        self._pending: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self.steps = 0  # llama_decode calls
        self.prompt_tokens_fed = 0  # prompt tokens decoded (the rest came from slots' caches)
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) -------------------------------------------------------
    def submit(self, tokens: list[int], params: GenParams, cancel: threading.Event,
               emit: Callable[[str], None], media: dict | None = None) -> Future:
        """Queue a generation; its Future gives the GenResult. Raises InvalidRequest at once for a bad prompt.

        `media`: the prompt's images by start position (engine/media.py); their positions in `tokens` hold
        pseudo-tokens, and the prompt must end in text."""
        if len(tokens) >= self.n_ctx_seq:
            raise InvalidRequest(
                f"This model's maximum context length is {self.n_ctx_seq} tokens, but the prompt is "
                f"{len(tokens)} tokens.", param=params.prompt_param)
        if not tokens:
            raise InvalidRequest("the prompt is empty", param=params.prompt_param)
        if media:
            if self.projector is None:
                raise InvalidRequest("this model does not accept images", param=params.prompt_param)
            if max(p + c.n_tokens for p, c in media.items()) >= len(tokens) or params.prompt_logprobs:
                raise InvalidRequest("a prompt with images must end in text and cannot be scored",
                                     param=params.prompt_param)
        sampler = self._samplers.build(params)  # here, so a bad grammar or prefix is a 400 before anything is sent
        fut: Future = Future()
        job = _Job(list(tokens), params, cancel, emit, fut, time.perf_counter(), sampler, media or None)
        with self._cv:
            if self._closing:
                self._samplers.free(sampler)
                raise EngineError("the engine is shut down")
            self._pending.append(job)
            self._cv.notify()
        return fut

    @property
    def active(self) -> int:
        return len(self._active)

    def kv_cells_used(self) -> int:
        """KV cells that hold tokens: each busy slot's computed positions, each idle slot's cached prefix
        (kept for reuse). Read from any thread: a snapshot, at most one step old."""
        used = 0
        for slot in list(self._slots):
            seq = slot.seq
            used += seq.n_past if seq is not None else len(slot.cached)
        return min(used, self.n_ctx)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop (unfinished requests end as cancelled), then free the context."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("batch engine thread did not stop; leaving its context allocated")
            return
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self._context.close()

    # -- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._active and not self._pending:
                    self._cv.wait()
                if self._closing:
                    break
                new = []
                while self._pending and len(self._active) + len(new) < self.parallel:
                    new.append(self._pending.popleft())
            for job in new:
                self._admit(job)
            if self._active:
                try:
                    self._step()
                except Exception as exc:  # a failed decode: fail this step's requests, keep serving
                    log.exception("batch step failed")
                    for seq in list(self._active):
                        self._fail(seq, exc)
        for seq in list(self._active):
            self._finish(seq, "cancelled")
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
        for job in pending:
            self._samplers.free(job.sampler)
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(self._unstarted(job))

    @staticmethod
    def _unstarted(job: _Job) -> GenResult:
        return GenResult(len(job.tokens), 0, "cancelled", 0.0, time.perf_counter() - job.t0)

    def _admit(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():  # its caller gave up on it already
            self._samplers.free(job.sampler)
            return
        if job.cancel.is_set():
            self._samplers.free(job.sampler)
            job.future.set_result(self._unstarted(job))
            return
        tokens = job.tokens
        free = [s for s in self._slots if s.seq is None]
        slot = max(free, key=lambda s: (self._reusable(s, tokens), -s.seq_id))
        # Scoring the prompt needs logits at every prompt position: compute it all again.
        keep = 0 if job.params.prompt_logprobs else min(self._reusable(slot, tokens),
                                                         job.first_media() // self.prompt_chunk * self.prompt_chunk)
        if keep < len(slot.cached):
            if not self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                keep = 0
            slot.cached = slot.cached[:keep]
        p = job.params
        room = self.n_ctx_seq - len(tokens)
        limit = min(room if p.max_tokens is None else p.max_tokens, room)
        seq = _Seq(job=job, slot=slot.seq_id, history=list(tokens), n_past=keep, limit=limit,
                   sampler=job.sampler, text=TextStops(p.stop), cached=keep,
                   prompt_lp=[None] if p.prompt_logprobs else None)
        job.sampler = None  # owned by the sequence now
        slot.seq = seq
        self._active.append(seq)

    def _reusable(self, slot: _Slot, tokens: list[int]) -> int:
        """Cached prompt tokens a new prompt can keep: whole chunks only, and never the last token.

        A prompt is always fed in chunks that start at multiples of `prompt_chunk`, one prompt per
        llama_decode; llama.cpp's results depend on how tokens are grouped into batches, so keeping
        only whole chunks makes a reused prefix bit-for-bit what a fresh prompt would compute.
        """
        chunk = self.prompt_chunk
        keep = min(_common_prefix(slot.cached, tokens), slot.aligned, len(tokens) - 1)
        return keep // chunk * chunk

    def _step(self) -> None:
        """Prompt chunks (each its own llama_decode), then one llama_decode for every generating sequence."""
        for seq in [s for s in self._active if s.job.cancel.is_set()]:
            self._finish(seq, "cancelled")
        budget = self.prompt_chunk
        for seq in list(self._active):  # oldest first
            if budget <= 0:
                break
            start, n_prompt = seq.n_past, len(seq.job.tokens)
            if start >= n_prompt:
                continue
            media = seq.job.media
            if media:
                if start in media:
                    budget -= self._image(seq, media[start])
                    continue
                # text up to the next image at most: an image goes into the KV by itself
                n_prompt = min([p for p in media if p > start] + [n_prompt])
            n = min(self.prompt_chunk, n_prompt - start)
            self._decode([(seq, n)])
            self.prompt_tokens_fed += n
            budget -= n
        generating = sorted((s for s in self._active if s.n_past == len(s.history) - 1), key=lambda s: s.slot)
        if generating:
            self._decode([(seq, 1) for seq in generating])

    def _image(self, seq: _Seq, chunk) -> int:
        """Encode one image of `seq`'s prompt and decode its embeddings into the slot (libmtmd); a failure
        ends only this request. Returns the positions it took."""
        try:
            end = self.projector.evaluate(chunk, self._ctx, seq.n_past, seq.slot, self.n_batch)
            if end != seq.n_past + chunk.n_tokens:
                raise EngineError(f"an image took {end - seq.n_past} positions, expected {chunk.n_tokens}")
        except Exception as exc:
            log.exception("evaluating an image failed")
            self._fail(seq, exc if isinstance(exc, EngineError) else EngineError(str(exc)))
            return chunk.n_tokens
        self.steps += 1
        self.prompt_tokens_fed += chunk.n_tokens
        seq.n_past = end
        return chunk.n_tokens

    def _decode(self, parts: list[tuple[_Seq, int]]) -> None:
        """Feed the next `n` tokens of each sequence (in this order), then sample those that caught up."""
        batch = self._batch
        token, pos, n_seq_id, seq_ids, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        i = 0
        for seq, n in parts:
            start, hist, sid = seq.n_past, seq.history, seq.slot
            score = seq.prompt_lp is not None and start < len(seq.job.tokens)
            for j in range(start, start + n):
                token[i] = hist[j]
                pos[i] = j
                n_seq_id[i] = 1
                seq_ids[i][0] = sid
                logits[i] = 0
                if score and j + 1 < len(seq.job.tokens):
                    logits[i] = 1
                    seq.prompt_outputs.append((i, j + 1))
                i += 1
            seq.n_past = start + n
            seq.out_index = -1
            if seq.n_past == len(hist):  # caught up: sample its next token from this position
                logits[i - 1] = 1
                seq.out_index = i - 1
        batch.n_tokens = i
        rc = self._lc.llama_decode(self._ctx, batch)
        self.steps += 1
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc}")
        now = time.perf_counter()
        for seq, _ in parts:
            if seq.prompt_outputs:
                for bi, target in seq.prompt_outputs:
                    seq.prompt_lp.append(token_entry(self._logits(bi), seq.history[target],
                                                     seq.job.params.logprobs or 0, self._piece))
                seq.prompt_outputs.clear()
            if seq.out_index < 0:
                continue
            if seq.limit <= 0:  # scoring only (echo with max_tokens 0)
                self._finish(seq, "length")
                continue
            logits_row = self._logits(seq.out_index)
            tok = self._samplers.sample(seq.sampler, seq.out_index, logits_row)
            if tok is None:  # the grammar is complete: nothing more may follow
                self._finish(seq, "stop")
                continue
            if seq.job.params.logprobs is not None:
                seq.pending_lp.append(token_entry(logits_row, tok, seq.job.params.logprobs, self._piece))
            self._sampled(seq, tok, now)

    def _logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))

    def _sampled(self, seq: _Seq, tok: int, now: float) -> None:
        if seq.n_out == 0:
            seq.ttft = now - seq.job.t0
        if self._lc.llama_vocab_is_eog(self._vocab, tok):
            seq.pending_lp.clear()
            self._finish(seq, "stop")
            return
        seq.n_out += 1
        seq.token_times.append(now)
        delta = seq.text.feed(self._piece(tok))
        if delta:
            self._emit(seq.job, delta, seq.pending_lp)
            seq.pending_lp = []
        if seq.text.stopped:
            seq.pending_lp.clear()
            self._finish(seq, "stop")
        elif seq.n_out >= seq.limit:
            self._finish(seq, "length")
        else:
            seq.history.append(tok)

    @staticmethod
    def _emit(job: _Job, text: str, logprobs: list | None = None) -> None:
        try:
            job.emit(text, logprobs or None)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            log.debug("emit failed; cancelling", exc_info=True)
            job.cancel.set()

    def _piece(self, tok: int) -> bytes:
        piece = self._pieces.get(tok)
        if piece is None:
            buf = self._piece_buf
            n = self._lc.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lc.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            piece = self._pieces[tok] = buf.raw[:n]
        return piece

    def _release(self, seq: _Seq) -> None:
        self._active.remove(seq)
        slot = self._slots[seq.slot]
        slot.seq = None
        slot.cached = seq.history[:seq.n_past]
        # Prompt chunks start at multiples of prompt_chunk: the whole ones are reusable.
        n_prompt = min(seq.n_past, len(seq.job.tokens), seq.job.first_media())
        slot.aligned = n_prompt // self.prompt_chunk * self.prompt_chunk
        self._samplers.free(seq.sampler)
        seq.sampler = None

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._release(seq)
        job = seq.job
        if reason != "cancelled":
            rest = seq.text.finish()
            if rest or seq.pending_lp:
                self._emit(job, rest, seq.pending_lp)
        now = time.perf_counter()
        job.future.set_result(GenResult(len(job.tokens), seq.n_out, reason, seq.ttft or (now - job.t0), now - job.t0,
                                        cached_tokens=seq.cached, prompt_logprobs=seq.prompt_lp,
                                        first_token_s=seq.ttft or None, token_gaps=token_gaps(seq.token_times)))

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        self._release(seq)
        # Its KV may hold a partial step: forget it.
        self._lc.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
        self._slots[seq.slot].cached, self._slots[seq.slot].aligned = [], 0
        seq.job.future.set_exception(exc)

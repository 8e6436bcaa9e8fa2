"""Sampling for the batch engine (engine/batch.py): each sequence's native llama.cpp samplers.

A sequence gets the sampler chain `Llama.generate` builds (repetition penalties, logit bias, then greedy at
temperature 0, else top-k, top-p, min-p, temperature, dist(seed)) and, apart from it, its JSON grammar:
the grammar checks the chain's pick first and masks the most likely tokens, or the whole vocabulary, only
when it refuses that pick (what llama.cpp's common sampler does). Plain greedy decoding needs no samplers:
the argmax of the logits is llama.cpp's greedy pick.
"""

from __future__ import annotations

import ctypes
import logging
import random
from dataclasses import dataclass

import numpy as np

from aivailable.engine.runner import (
    DEFAULT_MIN_P,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    GenParams,
)
from aivailable.errors import InvalidRequest

__all__ = ["GRAMMAR_TIERS", "PENALTY_LAST_N", "Sampler", "Samplers"]

log = logging.getLogger("aivailable.batch")

# llama-cpp-python's `last_n_tokens_size`: how many recent tokens the repetition penalties look at.
PENALTY_LAST_N = 64
# With a grammar that refuses the chain's pick: how many of the most likely tokens it checks, in turn,
# before it checks the whole vocabulary (262k tokens for Gemma: a tenth of a second on a CPU).
GRAMMAR_TIERS = (64, 4096)


@dataclass(eq=False)
class Sampler:
    """One sequence's native samplers: the chain (penalties, bias, top-k/p, min-p, temperature, dist or
    greedy) and, apart from it, the grammar, which is checked against the chain's pick first and applied
    to the whole vocabulary only when it refuses that pick (what llama.cpp's common sampler does)."""

    chain: object | None
    grammar: object | None
    stateless: bool = False
    """The chain keeps no history (no penalties): its pick may be made and accepted natively, on llama.cpp's
    own candidate array, before the grammar checks it."""


class Samplers:
    """Builds, runs and frees the samplers of one llama.cpp context's sequences. Sampling, accepting and
    freeing happen on the engine's thread; `build` also runs on the submitting thread."""

    def __init__(self, llama_cpp, ctx, vocab):
        """`llama_cpp` is the llama_cpp module, `ctx` the context (llama_context_p), `vocab` its model's."""
        self._lc = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._cand = (llama_cpp.llama_token_data * self._n_vocab)()
        self._cand_view = np.frombuffer(self._cand, dtype=np.dtype(
            [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True))
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._eog = np.array([t for t in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab))
                              if t >= 0], dtype=np.int64)

    def build(self, p: GenParams) -> Sampler | None:
        """The samplers for these parameters (the chain `Llama.generate` builds; typical_p = 1 is a no-op).

        None for plain greedy decoding (temperature 0, no penalty, bias or grammar): `sample` then takes
        the argmax of the logits itself, the token llama.cpp's greedy sampler picks (the first highest
        logit), without copying the whole vocabulary into a candidate array first.
        """
        temp = DEFAULT_TEMPERATURE if p.temperature is None else p.temperature
        if (temp == 0 and p.grammar is None and p.repeat_penalty in (None, 1.0) and not p.frequency_penalty
                and not p.presence_penalty and not p.logit_bias):
            return None
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda smpl: lc.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if p.logit_bias:
            bias = (lc.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, b) in enumerate(p.logit_bias.items()):
                if not 0 <= tok < self._n_vocab:
                    lc.llama_sampler_free(chain)
                    raise InvalidRequest(f"logit_bias names token {tok}, outside this model's vocabulary "
                                         f"of {self._n_vocab} tokens", param="logit_bias")
                bias[i].token, bias[i].bias = tok, b
            add(lc.llama_sampler_init_logit_bias(self._n_vocab, len(p.logit_bias), bias))
        add(lc.llama_sampler_init_penalties(
            self._n_vocab, PENALTY_LAST_N, 1.0 if p.repeat_penalty is None else p.repeat_penalty,
            p.frequency_penalty or 0.0, p.presence_penalty or 0.0))
        if temp == 0:
            add(lc.llama_sampler_init_greedy())
        else:
            add(lc.llama_sampler_init_top_k(DEFAULT_TOP_K if p.top_k is None else p.top_k))
            add(lc.llama_sampler_init_top_p(DEFAULT_TOP_P if p.top_p is None else p.top_p, 1))
            add(lc.llama_sampler_init_min_p(DEFAULT_MIN_P if p.min_p is None else p.min_p, 1))
            add(lc.llama_sampler_init_temp(temp))
            add(lc.llama_sampler_init_dist(p.seed if p.seed is not None else random.getrandbits(31)))
        grammar = None
        if p.grammar is not None:
            grammar = lc.llama_sampler_init_grammar(self._vocab, p.grammar.encode(), b"root")
            if not grammar:
                lc.llama_sampler_free(chain)
                log.warning("llama.cpp could not parse a grammar:\n%s", p.grammar[:2000])
                raise InvalidRequest("the response format or tools could not be turned into a grammar",
                                     param="response_format")
            stateless = (p.repeat_penalty in (None, 1.0) and not p.frequency_penalty and not p.presence_penalty)
            sampler = Sampler(chain, grammar, stateless)
            if p.grammar_prefix:
                self._accept_prefix(sampler, p.grammar_prefix)
            return sampler
        return Sampler(chain, None)

    def _accept_prefix(self, sampler: Sampler, text: str) -> None:
        """Advance the grammar over text generated before (a resumed stream); 400 if it does not match."""
        from llama_cpp import llama_tokenize

        data = text.encode()
        buf = (self._lc.llama_token * (len(data) + 8))()
        n = llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, False)
        for tok in buf[:max(n, 0)]:
            if not self._grammar_allows(sampler.grammar, tok):
                self.free(sampler)
                raise InvalidRequest("the final assistant message does not match the response format, so it "
                                     "cannot be continued under it", param="messages")
            self._lc.llama_sampler_accept(sampler.grammar, tok)
            self._lc.llama_sampler_accept(sampler.chain, tok)

    def free(self, sampler: Sampler | None) -> None:
        """Free a sequence's native samplers (None: nothing to free); safe to call twice."""
        if sampler is None:
            return
        for smpl in (sampler.chain, sampler.grammar):
            if smpl is not None:
                self._lc.llama_sampler_free(smpl)
        sampler.chain = sampler.grammar = None

    def _grammar_allows(self, grammar, tok: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 0.0, 0.0
        arr = self._lc.llama_token_data_array(one, 1, -1, False)
        self._lc.llama_sampler_apply(grammar, ctypes.byref(arr))
        return arr.data[0].logit != float("-inf")

    def _candidates(self, logits: np.ndarray, ids: np.ndarray | None = None):
        """llama.cpp's candidate array of the whole vocabulary (or of `ids`), filled from `logits`."""
        n = self._n_vocab if ids is None else len(ids)
        view = self._cand_view[:n]
        view["id"] = self._ids if ids is None else ids
        view["logit"] = logits if ids is None else logits[ids]
        view["p"] = 0.0
        return self._lc.llama_token_data_array(self._cand, n, -1, False)

    def sample(self, smp: Sampler | None, out_index: int, logits: np.ndarray) -> int | None:
        """The next token from `logits` (the context's output row `out_index`), accepted by `smp`; None when
        its grammar allows no token.

        With a grammar: the chain's pick is kept when the grammar allows it. Otherwise the grammar masks
        the most likely tokens (GRAMMAR_TIERS, with the end-of-generation tokens) and the chain samples
        among those left; only when none is allowed does the grammar go over the whole vocabulary."""
        if smp is None:
            return int(logits.argmax())
        lc = self._lc
        if smp.grammar is None:
            return lc.llama_sampler_sample(smp.chain, self._ctx, out_index)
        if smp.stateless:
            tok = lc.llama_sampler_sample(smp.chain, self._ctx, out_index)
        else:
            arr = self._candidates(logits)
            lc.llama_sampler_apply(smp.chain, ctypes.byref(arr))
            tok = arr.data[arr.selected].id
        if not self._grammar_allows(smp.grammar, tok):
            tok = None
            top = np.argpartition(-logits, GRAMMAR_TIERS[-1])[:GRAMMAR_TIERS[-1]]
            order = top[np.argsort(-logits[top], kind="stable")]
            for n in GRAMMAR_TIERS:  # the end-of-generation tokens too: a complete grammar allows only them
                tok = self._constrained(smp, logits, np.unique(np.concatenate((order[:n], self._eog))))
                if tok is not None:
                    break
            if tok is None:
                tok = self._constrained(smp, logits, None)
            if tok is None:
                return None
        lc.llama_sampler_accept(smp.chain, tok)
        lc.llama_sampler_accept(smp.grammar, tok)
        return tok

    def _constrained(self, smp: Sampler, logits: np.ndarray, ids: np.ndarray | None) -> int | None:
        lc = self._lc
        arr = self._candidates(logits, ids)
        lc.llama_sampler_apply(smp.grammar, ctypes.byref(arr))
        n = arr.size
        if not np.isfinite(self._cand_view["logit"][:n]).any():
            return None
        lc.llama_sampler_apply(smp.chain, ctypes.byref(arr))
        tok = arr.data[arr.selected].id if 0 <= arr.selected < arr.size else -1
        return tok if tok >= 0 and self._grammar_allows(smp.grammar, tok) else None

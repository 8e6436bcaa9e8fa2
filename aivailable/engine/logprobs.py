"""Log-probabilities of tokens, from the model's raw logits (before sampling changes them).

The engine records one entry per token in the chat-completions shape; `legacy` turns a list of them into
the completions shape (tokens, token_logprobs, top_logprobs, text_offset).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _lse(logits: np.ndarray) -> float:
    m = float(logits.max())
    return m + float(np.log(np.exp(logits - m, dtype=np.float64).sum()))


def _item(tok: int, lp: float, piece: Callable[[int], bytes]) -> dict:
    raw = piece(tok)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}


def token_entry(logits: np.ndarray, tok: int, top: int, piece: Callable[[int], bytes]) -> dict:
    """{token, logprob, bytes, top_logprobs: [...]} for `tok`, with the `top` most likely alternatives."""
    lse = _lse(logits)
    entry = _item(tok, float(logits[tok]) - lse, piece)
    alts = []
    if top > 0:
        idx = np.argpartition(-logits, top)[:top]
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        alts = [_item(int(i), float(logits[i]) - lse, piece) for i in idx]
    entry["top_logprobs"] = alts
    return entry


def legacy(entries: list[dict | None], offset: int = 0, first_token: str | None = None) -> dict:
    """Completions-style logprobs; a None entry (the prompt's first token) has no logprob."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        if e is None:
            text = first_token or ""
            tokens.append(text)
            lps.append(None)
            tops.append(None)
        else:
            text = e["token"]
            tokens.append(text)
            lps.append(e["logprob"])
            tops.append({a["token"]: a["logprob"] for a in e["top_logprobs"]})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

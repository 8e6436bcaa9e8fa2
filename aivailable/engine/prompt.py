"""Chat prompts whose control tokens come only from the template, never from what clients wrote.

A chat template is rendered with a placeholder in place of every message's text. The rendered string
is then cut at the placeholders: the template's own text is tokenized with control-token parsing on
(so `<start_of_turn>`, `<|im_start|>` ... in the template become their tokens), each message's text
with it off (so the same strings typed by a user stay plain text). Adjacent plain pieces are joined
before tokenizing, so for text without control-token strings the tokens are exactly those of
tokenizing the whole rendered prompt at once.

Client strings a template renders itself (tool definitions, tool-call arguments, names) cannot be
kept apart this way; a request whose such strings contain a control-token string gets a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aivailable.errors import InvalidRequest

_MARK = re.compile("\ue000(\\d+)\ue001")
MAX_BYTES_PER_TOKEN = 64
"""No real vocabulary has longer pieces in practice; a prompt longer than the context times this cannot fit
and is refused before tokenizing."""


def _mark(i: int) -> str:
    return f"\ue000{i}\ue001"


@dataclass(frozen=True)
class Specials:
    """The vocabulary's control tokens, by text (what tokenizing with special parsing turns into ids)."""

    ids: dict[str, int]
    pattern: re.Pattern | None

    @classmethod
    def of(cls, ids: dict[str, int]) -> Specials:
        texts = sorted((t for t in ids if t), key=len, reverse=True)
        return cls(ids, re.compile("|".join(map(re.escape, texts))) if texts else None)

    def find(self, text: str) -> str | None:
        """The first control-token string in `text`, or None."""
        if self.pattern is None:
            return None
        m = self.pattern.search(text)
        return m.group(0) if m else None


def vocab_specials(llama_cpp, vocab) -> Specials:
    """Control and unknown-attribute tokens of a loaded vocabulary (those llama.cpp parses as special)."""
    import ctypes

    n = llama_cpp.llama_vocab_n_tokens(vocab)
    mask = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    buf = ctypes.create_string_buffer(512)
    ids: dict[str, int] = {}
    for tok in range(n):
        if llama_cpp.llama_vocab_get_attr(vocab, tok) & mask:
            k = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            if k > 0:
                ids.setdefault(buf.raw[:k].decode("utf-8", errors="replace"), tok)
    return Specials.of(ids)


def check_client_strings(specials: Specials, value: Any, where: str) -> None:
    """400 if any string inside `value` (tool definitions, call arguments) holds a control-token string."""
    if isinstance(value, str):
        hit = specials.find(value)
        if hit:
            raise InvalidRequest(f"{where} contains the model's control token {hit!r}; it cannot be sent to "
                                 "this model's template", param=where)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_client_strings(specials, k, where)
            check_client_strings(specials, v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_client_strings(specials, v, f"{where}[{i}]")


def placeholders(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages with every non-empty text content replaced by a placeholder, and the texts in order."""
    texts: list[str] = []
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and content:
            m = {**m, "content": _mark(len(texts))}
            texts.append(content)
        out.append(m)
    return out, texts


def pieces(rendered: str, texts: list[str], suffix: str = "") -> list[tuple[str, bool]]:
    """(text, is_template) pieces of a prompt rendered with placeholders; `suffix` is client text."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _MARK.finditer(rendered):
        if m.start() > pos:
            out.append((rendered[pos:m.start()], True))
        i = int(m.group(1))
        if i < len(texts):
            out.append((texts[i], False))
        pos = m.end()
    if pos < len(rendered):
        out.append((rendered[pos:], True))
    if suffix:
        out.append((suffix, False))
    return out


def tokenize_pieces(parts: list[tuple[str, bool]], specials: Specials,
                    tokenize_plain: Callable[[str], list[int]],
                    cancelled: Callable[[], bool] = lambda: False) -> list[int]:
    """Tokens of `parts`: control-token strings are parsed only in template pieces."""
    fragments: list[str | int] = []  # plain text, or a control token's id

    def plain(text: str) -> None:
        if fragments and isinstance(fragments[-1], str):
            fragments[-1] += text
        elif text:
            fragments.append(text)

    for text, is_template in parts:
        if not is_template or specials.pattern is None:
            plain(text)
            continue
        pos = 0
        for m in specials.pattern.finditer(text):
            plain(text[pos:m.start()])
            fragments.append(specials.ids[m.group(0)])
            pos = m.end()
        plain(text[pos:])
    tokens: list[int] = []
    for frag in fragments:
        if cancelled():
            raise InvalidRequest("the request was cancelled", param=None)
        if isinstance(frag, int):
            tokens.append(frag)
        else:
            tokens.extend(tokenize_plain(frag))
    return tokens


def check_size(parts: list[tuple[str, bool]], n_ctx_seq: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt that cannot fit the context whatever its tokens."""
    size = sum(len(t.encode()) for t, _ in parts)
    if size > n_ctx_seq * MAX_BYTES_PER_TOKEN:
        raise InvalidRequest(f"The prompt is {size} bytes; this model's context of {n_ctx_seq} tokens cannot hold it.",
                             param=param)

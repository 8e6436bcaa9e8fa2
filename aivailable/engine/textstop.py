"""Incremental detokenization with stop strings: what a generation loop emits, token by token.

Pure (no llama.cpp): the single-sequence and the batched engine feed each generated token's bytes to
a `TextStops` and emit what it returns, so both cut stop sequences and hold back text identically.
"""

from __future__ import annotations

import codecs


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing chars of `text` could still be the start of a stop sequence."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class TextStops:
    """UTF-8 text of one generation so far; releases only text that cannot be part of a stop string.

    `feed(piece)` takes one token's bytes and returns the text that is now safe to send ("" if none);
    after it returns, `stopped` says whether a stop string was found (the text before it was released,
    the stop string itself never is). `finish()` releases what was held back for a stop that never came.
    """

    __slots__ = ("stops", "_decoder", "_text", "_sent", "stopped")

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        if not self.stops:  # nothing to hold back: keep no text
            return self._decoder.decode(piece)
        text = self._text = self._text + self._decoder.decode(piece)
        sent, stops = self._sent, self.stops
        cut = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._sent = len(text)
            return text[sent:cut] if cut > sent else ""
        safe = len(text) - held_back(text, stops)
        if safe > sent:
            self._sent = safe
            return text[sent:safe]
        return ""

    def finish(self) -> str:
        """The rest of the text (held back, or an incomplete UTF-8 sequence); "" after a stop string."""
        if self.stopped:
            return ""
        rest = self._text + self._decoder.decode(b"", final=True)
        out = rest[self._sent:]
        self._text, self._sent = rest, len(rest)
        return out

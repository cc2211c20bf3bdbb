"""Stop strings over streamed text: emit what cannot be the start of a stop string, hold the rest.

OpenAI's `stop` ends a completion at the first occurrence of any stop string, which is not part
of the returned text. Text arrives in pieces (one per token), and a stop string may span several
pieces, so a piece is held back as long as the end of the text could still grow into a stop.
"""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""  # text not emitted yet: a possible start of a stop string

    def push(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was reached)."""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = self._partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end (EOS, length): the held text was no stop after all."""
        text, self._held = self._held, ""
        return text

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

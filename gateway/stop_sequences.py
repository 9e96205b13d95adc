"""Stop sequences on text: find them across chunk boundaries, never emit what might start one.

Token-id stop words miss a stop string that starts inside a token or that tokenizes differently in
context, so the gateway enforces stop sequences on the decoded text: it holds back the longest tail that
could still become a stop sequence, releases it once it cannot, and cuts the text at the first match: the
stop sequence that completes first (the text up to its start is what the client gets).
"""

from __future__ import annotations


class StopSequenceMatcher:
    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stop_sequences if s)
        self.pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Add decoded text; return what can be emitted now. After a match, everything else is dropped."""
        if self.matched:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        # The stop that completes first, as if the text arrived one character at a time (then the one that
        # starts first): the same cut however the text is split into chunks.
        matches = [(start + len(stop), start) for stop in self.stops if (start := self.pending.find(stop)) >= 0]
        if matches:
            _, first = min(matches)
            self.matched = True
            out, self.pending = self.pending[:first], ""
            return out
        keep = self._longest_partial_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        """At the end of generation: the held-back text (it never became a stop sequence)."""
        out, self.pending = ("" if self.matched else self.pending), ""
        return out

    def _longest_partial_suffix(self) -> int:
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:length]):
                    best = length
                    break
        return best

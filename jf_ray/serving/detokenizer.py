"""Token ids -> text deltas for streaming, with OpenAI ``stop`` strings.

A parallel decoder hands over several tokens per step, and a stop string can span two steps, so text that
could still be the start of a stop string is held back until the next tokens decide it. Trailing U+FFFD
(half of a multi-byte character split across tokens) is held back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class TextDelta:
    text: str  # new text to send (may be empty)
    stopped: bool  # a stop string was found; the completion ends before it


class IncrementalDetokenizer:
    """Feeds on new token ids, returns only text that is final. Decodes the whole completion each time.

    Whole decoding keeps byte-level BPE merges and leading-space rules exactly as a one-shot
    ``tokenizer.decode`` would produce them; completions are short enough that the quadratic cost is noise
    next to one forward.
    """

    def __init__(self, tokenizer, stop_strings: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # decoded text of token_ids
        self.stopped = False

    def add(self, new_ids: list[int]) -> TextDelta:
        if self.stopped:
            return TextDelta("", True)
        self.token_ids.extend(new_ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stop_at = self._find_stop()
        if stop_at is not None:
            self.stopped = True
            return self._emit_until(stop_at, stopped=True)
        return self._emit_until(self._safe_end(), stopped=False)

    def flush(self) -> str:
        """Text held back when the completion ends for another reason (EOS, length)."""
        if self.stopped:
            return ""
        return self._emit_until(len(self.text), stopped=False).text

    @property
    def final_text(self) -> str:
        return self.text[: self.emitted]

    def _emit_until(self, end: int, stopped: bool) -> TextDelta:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return TextDelta(delta, stopped)

    def _find_stop(self) -> int | None:
        if not self.stop_strings:
            return None
        # Text before ``emitted`` has been checked already; a stop may start up to len(stop)-1 chars earlier.
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        return end - held_back_prefix(self.text[:end], self.stop_strings)


def held_back_prefix(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best

"""Token ids -> text deltas for streaming, with OpenAI ``stop`` strings.

Text is decoded incrementally with the ``tokenizers`` library's ``DecodeStream``: each token costs one
small decode of the tokens since the last complete character, so a long completion costs linear time
rather than a full re-decode per step. ``DecodeStream`` itself holds back bytes that do not yet make a
complete UTF-8 character (a multi-byte character split across tokens).

A parallel decoder hands over several tokens per step, and a stop string can span two steps, so text that
could still be the start of a stop string is held back until the next tokens decide it. Each token's start
offset in the text is kept, so a token is handed out (for logprobs) together with the text it begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream


@dataclass
class TextDelta:
    text: str  # new text to send (may be empty)
    stopped: bool  # a stop string was found; the completion ends before it
    token_offsets: list[int] = field(default_factory=list)  # start offsets of the tokens released with it


class IncrementalDetokenizer:
    """Feeds on new token ids, returns only text that is final, and which tokens that text released.

    Needs a fast (``tokenizers``-backed) tokenizer, which ``AutoTokenizer`` loads for every checkpoint with
    a ``tokenizer.json``.
    """

    def __init__(self, tokenizer, stop_strings: list[str] | None = None) -> None:
        self.core = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers wrapper or a bare Tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.text = ""  # decoded text of every complete character so far
        self.offsets: list[int] = []  # start offset in ``text`` of each token whose characters are complete
        self.pending: list[int] = []  # tokens fed whose bytes do not complete a character yet
        self.emitted = 0  # characters of ``text`` already handed out
        self.released = 0  # tokens already handed out
        self.stopped = False

    def add(self, new_ids: list[int]) -> TextDelta:
        if self.stopped:
            return TextDelta("", True)
        start = len(self.text)  # where this step's text begins: a stop may start up to len(stop)-1 earlier
        for token_id in new_ids:
            self.pending.append(token_id)
            piece = self.stream.step(self.core, token_id)
            if piece is not None:
                self._complete(piece)
        stop_at = self._find_stop(start)
        if stop_at is not None:
            self.stopped = True
            return self._emit_until(stop_at, stopped=True)
        return self._emit_until(len(self.text) - held_back_prefix(self.text, self.stop_strings), stopped=False)

    def flush(self) -> TextDelta:
        """Text and tokens held back when the completion ends for another reason (EOS, length).

        An incomplete last character (the token cap or EOS cut it) becomes U+FFFD, as a one-shot decode has it.
        """
        if self.stopped:
            return TextDelta("", True)
        if self.pending:
            self._complete(self.core.decode(self.pending, skip_special_tokens=True))
        return self._emit_until(len(self.text), stopped=False, final=True)

    def _complete(self, piece: str) -> None:
        self.offsets.extend([len(self.text)] * len(self.pending))
        self.pending = []
        self.text += piece

    @property
    def final_text(self) -> str:
        return self.text[: self.emitted]

    def _emit_until(self, end: int, stopped: bool, final: bool = False) -> TextDelta:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        # A token goes out with the text it begins; at the end (not at a stop) the text-less ones go too.
        count = self.released
        while count < len(self.offsets) and (self.offsets[count] < end or (final and self.offsets[count] <= end)):
            count += 1
        released, self.released = self.offsets[self.released : count], count
        return TextDelta(delta, stopped, released)

    def _find_stop(self, new_text_start: int) -> int | None:
        if not self.stop_strings:
            return None
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, min(self.emitted, new_text_start) - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None


def held_back_prefix(text: str, stop_strings: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best

"""Prompt-lookup (n-gram) speculative decoding: the training-free baseline (vLLM's ``ngram`` speculator).

The draft after the head is copied from the context: find the most recent earlier occurrence of the
context's last k tokens (k from ``lookup_max_ngram`` down to 1) and take the tokens that followed it. A
weak or repetitive model gets a high tokens-per-forward from copying alone, which is why this decoder is
measured beside Jacobi Forcing.
"""

from __future__ import annotations

from jf_ray.decoding.query import Segment
from jf_ray.decoding.request import RequestState
from jf_ray.decoding.types import DecodeConfig


class ContextLookup:
    """The context's n-grams (up to ``max_ngram`` tokens) indexed by where their latest occurrence ends, kept
    as the context grows: a lookup reads a few dictionary entries where a scan would read the whole context,
    every forward (the context only grows: a request's output is append-only)."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end of its latest occurrence before the last token

    def sync(self, req: RequestState) -> None:
        """Take in the tokens ``req`` committed since the last call."""
        known = len(self.tokens)
        prompt = len(req.prompt_ids)
        if known < prompt:
            self._extend(req.prompt_ids[known:])
            known = prompt
        self._extend(req.generated[known - prompt :])

    def _extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # n-grams ending here are now followed by a token: they may be looked up
            for size in range(1, min(self.max_ngram, end) + 1):
                self.ends[tuple(self.tokens[end - size : end])] = end
            self.tokens.append(token)

    def continuation(self, max_tokens: int) -> list[int]:
        """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
        if max_tokens <= 0:
            return []
        for size in range(min(self.max_ngram, len(self.tokens) - 1), 0, -1):
            end = self.ends.get(tuple(self.tokens[-size:]))
            if end is not None:
                return self.tokens[end : end + max_tokens]
        return []


class LookupPolicy:
    def __init__(self, max_tokens: int, max_ngram: int):
        self.max_tokens = max_tokens
        self.context = ContextLookup(max_ngram)

    def plan(self, req: RequestState) -> list[Segment]:
        room = min(self.max_tokens, req.budget - 1)
        self.context.sync(req)
        copied = self.context.continuation(room)
        return [Segment([req.head] + copied, req.next_position)]

    def update(self, req: RequestState) -> None:
        verdict = req.verify(0)
        if verdict.accepted > 1:
            req.stats.recycled_hits += 1
        req.accept(0, verdict)


def lookup(config: DecodeConfig) -> LookupPolicy:
    """Builder named in jf_ray.decoding.registry."""
    return LookupPolicy(config.lookup_tokens or max(config.block_size - 1, 1), config.lookup_max_ngram)

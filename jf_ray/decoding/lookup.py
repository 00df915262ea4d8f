"""Prompt-lookup (n-gram) speculative decoding: the training-free baseline (vLLM's ``ngram`` speculator).

The draft after the head is copied from the context: find the most recent earlier occurrence of the
context's last k tokens (k from ``lookup_max_ngram`` down to 1) and take the tokens that followed it. A
weak or repetitive model gets a high tokens-per-forward from copying alone, which is why this decoder is
measured beside Jacobi Forcing.
"""

from __future__ import annotations

import numpy as np

from jf_ray.decoding.query import Segment
from jf_ray.decoding.request import RequestState
from jf_ray.decoding.types import DecodeConfig


def lookup_continuation(context: list[int], max_ngram: int, max_tokens: int) -> list[int]:
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    if max_tokens <= 0 or len(context) < 2:
        return []
    ctx = np.asarray(context, dtype=np.int64)
    for size in range(min(max_ngram, len(ctx) - 1), 0, -1):
        suffix = ctx[-size:]
        windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], size)  # excludes the suffix itself
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + size
            return ctx[start : start + max_tokens].tolist()
    return []


class LookupPolicy:
    def __init__(self, max_tokens: int, max_ngram: int):
        self.max_tokens = max_tokens
        self.max_ngram = max_ngram

    def plan(self, req: RequestState) -> list[Segment]:
        room = min(self.max_tokens, req.budget - 1)
        copied = lookup_continuation(req.prompt_ids + req.generated, self.max_ngram, room)
        return [Segment([req.head] + copied, req.next_position)]

    def update(self, req: RequestState) -> None:
        verdict = req.verify(0)
        if verdict.accepted > 1:
            req.stats.recycled_hits += 1
        req.accept(0, verdict)


def lookup(config: DecodeConfig) -> LookupPolicy:
    """Builder named in jf_ray.decoding.registry."""
    return LookupPolicy(config.lookup_tokens or max(config.block_size - 1, 1), config.lookup_max_ngram)

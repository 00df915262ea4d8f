"""Multi-block Jacobi decoding with rejection recycling (paper Algorithm 1).

* The real-active (RA) block is plain Jacobi on the block next to the committed cache (``JacobiPolicy``);
  only its verified tokens are ever committed, which keeps the output exactly greedy AR.
* Up to K-1 pseudo-active blocks run ahead: each holds n guessed tokens for the next block(s) and is
  refined by a Jacobi update in the same forward, conditioned on the (unverified) RA draft before it. A
  pseudo block is spawned once the newest block has ``ceil(r * n)`` stable tokens.
* When the RA block completes, the first pseudo block is promoted and keeps its progress: its content
  becomes the new RA draft, re-verified under the now-exact prefix (the reference code drops it:
  docs/method-notes.md §8).
* Rejection recycling: drafts the model rejected go into an n-gram pool that persists across blocks.
  Sequences in the pool that contain the current head yield candidate drafts verified in the same forward
  (extra segments that see only the cache); the best verified candidate wins. With ``recycle_context`` (on
  by default, as in the reference code) the text generated so far is a source too (prompt-lookup style);
  turn it off to measure what the model's own parallel decoding gains without copying.
With sampling (temperature > 0) only the main draft is verified, so acceptance stays distribution-exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from jf_ray.decoding.acceptance import Verdict
from jf_ray.decoding.jacobi import JacobiPolicy
from jf_ray.decoding.lookup import ContextLookup
from jf_ray.decoding.query import Segment
from jf_ray.decoding.request import RequestState
from jf_ray.decoding.types import DecodeConfig


class NGramPool:
    """Recently rejected token sequences; candidates are their continuations after the current head."""

    def __init__(self, capacity: int):
        self.entries: deque[list[int]] = deque(maxlen=max(capacity, 1))

    def add(self, tokens: list[int]) -> None:
        if len(tokens) >= 2:
            self.entries.append(tokens)

    def candidates(self, draft: list[int], limit: int) -> list[list[int]]:
        """Up to ``limit`` distinct drafts ``[head] + continuation``, padded to ``len(draft)`` with its tail."""
        head, length, found = draft[0], len(draft), []
        if limit <= 0:
            return found
        for entry in reversed(self.entries):
            for i, token in enumerate(entry[:-1]):
                if token != head:
                    continue
                cont = entry[i + 1 : i + length]
                candidate = [head] + cont + draft[1 + len(cont) :]
                if candidate != draft and candidate not in found:
                    found.append(candidate)
                if len(found) >= limit:
                    return found
        return found


@dataclass
class Judgement:
    winner: int  # the segment whose verified prefix is committed (0: the main draft)
    verdict: Verdict  # the winner's
    main_accepted: int  # head + the main draft's tokens among those accepted: what it gained alone


class Recycler:
    """Rejection recycling, shared by ``multiblock`` and ``auto``: candidate drafts from the context and from
    an :class:`NGramPool` of rejected drafts, verified beside the main draft (segment 0) in the same forward."""

    def __init__(self, pool_size: int):
        self.pool = NGramPool(capacity=4 * pool_size)
        self.context: ContextLookup | None = None  # made on first use: the request's config names its n-gram size

    def candidates(self, req: RequestState, draft: list[int], limit: int) -> list[list[int]]:
        """Context continuation first (when enabled), then pool entries; at most ``limit``, all distinct."""
        found: list[list[int]] = []
        if limit <= 0:
            return found
        if req.config.recycle_context:
            if self.context is None:
                self.context = ContextLookup(req.config.lookup_max_ngram)
            self.context.sync(req)
            copied = self.context.continuation(len(draft) - 1)
            candidate = [draft[0]] + copied + draft[1 + len(copied) :]
            if copied and candidate != draft:
                found.append(candidate)
        for candidate in self.pool.candidates(draft, limit):
            if len(found) < limit and candidate not in found:
                found.append(candidate)
        return found

    def segments(self, req: RequestState, main: Segment, limit: int) -> list[Segment]:
        """Up to ``limit`` candidates of ``main`` as segments that see only the cache."""
        return [Segment(cand, main.start_position) for cand in self.candidates(req, main.tokens, limit)]

    def judge(self, req: RequestState, count: int) -> Judgement:
        """Verify the main draft and the ``count`` candidates after it; the main draft's rejected part joins
        the pool.

        Greedy: the candidate that accepts the most wins (the main draft on ties). Sampled: one
        distribution-exact walk over all of them (:func:`jf_ray.decoding.acceptance.speculative_verify_tree`).
        """
        if count and not req.config.greedy:
            winner, verdict = req.verify_tree(1 + count)
        else:
            verdicts = [req.verify(i) for i in range(1 + count)]
            winner = max(range(len(verdicts)), key=lambda i: (verdicts[i].accepted, -i))
            verdict = verdicts[winner]
        if winner:
            req.stats.recycled_hits += 1
        main, accepted = req.segments[0].tokens, req.segments[winner].tokens[1 : verdict.accepted]
        main_accepted = 1 + _leading_matches(main[1:], accepted)
        self.pool.add(main[main_accepted:])
        return Judgement(winner, verdict, main_accepted)


class MultiBlockPolicy:
    def __init__(self, block_size: int, num_blocks: int, pool_size: int, spawn_ratio: float):
        self.ra = JacobiPolicy(block_size)
        self.n = block_size
        self.max_blocks = num_blocks
        self.spawn_at = math.ceil(spawn_ratio * block_size)
        self.recycler = Recycler(pool_size)
        self.pseudo: list[list[int]] = []  # contents of the pseudo-active blocks, nearest first
        self.stable: list[int] = []  # per pseudo block: leading tokens its last refinement left unchanged
        self.num_candidates = 0

    def plan(self, req: RequestState) -> list[Segment]:
        main = self.ra.main_segment(req)
        segments = [main]
        if req.config.greedy and req.verify_budget:
            segments += self.recycler.segments(req, main, req.verify_budget)
        self.num_candidates = len(segments) - 1
        block_end = len(req.prompt_ids) + self.ra.block_start + self.n
        for k, content in enumerate(self.pseudo):
            before = [0] + [1 + self.num_candidates + j for j in range(k)]
            segments.append(Segment(content, block_end + k * self.n, sees=before))
        return segments

    def update(self, req: RequestState) -> None:
        judged = self.recycler.judge(req, self.num_candidates)
        self._refine_pseudo(req)
        if req.accept(judged.winner, judged.verdict):
            return
        block_before = self.ra.block_start
        self.ra.advance(req, judged.verdict, req.outputs[judged.winner].predictions)
        if self.ra.block_start != block_before:
            self._promote(req)  # the prediction after the old block is the new head, not a spawn guess
        else:
            self._maybe_spawn(req)

    def _refine_pseudo(self, req: RequestState) -> None:
        """One Jacobi update of every pseudo block: each token becomes the prediction of its left neighbour."""
        carry = req.outputs[0].predictions[-1]  # prediction for the first token after the RA block
        first = 1 + self.num_candidates
        for k, content in enumerate(self.pseudo):
            predictions = req.outputs[first + k].predictions
            refined = [carry] + predictions[: len(content) - 1]
            self.stable[k] = _leading_matches(content, refined)
            self.recycler.pool.add(content)
            self.pseudo[k] = refined
            carry = predictions[-1]

    def _promote(self, req: RequestState) -> None:
        if not self.pseudo:
            return
        content = self.pseudo.pop(0)
        self.stable.pop(0)
        # The verified head replaces the block's first guess; the rest is a draft with progress.
        self.ra.tail = content[1:] + req.context_sample(self.n - len(content))

    def _maybe_spawn(self, req: RequestState) -> None:
        if len(self.pseudo) + 1 >= self.max_blocks or not self.ra.reaches_block_end(req):
            return
        if self.pseudo:
            progress, first = self.stable[-1], req.outputs[-1].predictions[-1]
        else:
            progress, first = len(req.generated) - self.ra.block_start, req.outputs[0].predictions[-1]
        start = self.ra.block_start + (len(self.pseudo) + 1) * self.n  # index in ``generated``
        room = req.config.max_new_tokens - start
        if progress < self.spawn_at or room <= 0:
            return
        self.pseudo.append(([first] + req.context_sample(self.n - 1))[: min(self.n, room)])
        self.stable.append(0)


def _leading_matches(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def multiblock(config: DecodeConfig) -> MultiBlockPolicy:
    """Builder named in jf_ray.decoding.registry."""
    return MultiBlockPolicy(config.block_size, config.num_blocks, config.pool_size, config.spawn_ratio)

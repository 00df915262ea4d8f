"""Jacobi decoding of fixed blocks of n tokens (greedy AR is the special case n = 1).

Per forward the draft is ``[head] + guesses`` up to the end of the current block. The verified prefix is
committed (its K/V was computed under an exact prefix, so it is kept as is), the guesses after the first
mismatch are refreshed with the model's own predictions, and the draft shrinks until the block reaches its
fixed point; that last forward also yields the next block's head. A new block starts from guesses drawn
uniformly from the context (prompt + output), as the reference implementation does.

:class:`RollingJacobiPolicy` keeps n tokens in flight instead: no block boundaries, no restart.
"""

from __future__ import annotations

from jf_ray.decoding.acceptance import Verdict
from jf_ray.decoding.query import Segment
from jf_ray.decoding.request import RequestState
from jf_ray.decoding.types import BlockTrajectory, DecodeConfig


class JacobiPolicy:
    def __init__(self, block_size: int, record: bool = False):
        self.n = block_size
        self.block_start = 0  # index in ``generated`` of the current block's first token
        self.tail: list[int] | None = None  # guesses after the head; None at the start of a block
        self.record = record
        self.block_states: dict[int, list[list[int]]] = {}

    def draft_length(self, req: RequestState) -> int:
        to_block_end = self.block_start + self.n - (len(req.generated) - 1)
        return max(1, min(to_block_end, req.budget))

    def reaches_block_end(self, req: RequestState) -> bool:
        return self.block_start + self.n - (len(req.generated) - 1) <= req.budget

    def main_segment(self, req: RequestState) -> Segment:
        length = self.draft_length(req)
        if self.tail is None:
            self.tail = req.context_sample(self.n - 1)
            if self.record:  # the whole n-token initial draft, even where the token cap shortens the forward
                self.block_states[self.block_index] = [[req.head] + self.tail]
        return Segment([req.head] + self.tail[: length - 1], req.next_position)

    @property
    def block_index(self) -> int:
        return self.block_start // self.n

    def plan(self, req: RequestState) -> list[Segment]:
        return [self.main_segment(req)]

    def update(self, req: RequestState) -> None:
        verdict = req.verify(0)
        if not req.accept(0, verdict):
            self.advance(req, verdict, req.outputs[0].predictions)

    def advance(self, req: RequestState, verdict: Verdict, predictions: list[int]) -> None:
        """Refresh the draft after ``verdict`` was committed (``predictions`` of the winning segment)."""
        length = len(predictions)
        if verdict.accepted < length:
            self.tail = predictions[verdict.accepted : length - 1]
            if self.record:
                # Where the token cap shortened the draft, the last prediction still falls inside the block.
                state = (req.generated[self.block_start :] + predictions[verdict.accepted :])[: self.n]
                self.block_states[self.block_index].append(state)
        else:  # the whole block is verified; the new head opens the next block
            self.block_start += self.n
            self.tail = None

    def trajectory(self, req: RequestState) -> list[BlockTrajectory]:
        """Every block's recorded states, cut to the block's final length, the fixed point appended last."""
        blocks = []
        for start in range(0, len(req.generated), self.n):
            index, fixed = start // self.n, req.generated[start : start + self.n]
            # A block holding only the head that ended the request was never drafted: its draft is the head.
            states = self.block_states.get(index, [list(fixed)])
            kept = [s[: len(fixed)] for s in states] + [list(fixed)]
            blocks.append(BlockTrajectory(index, len(req.prompt_ids) + start, kept, list(fixed)))
        return blocks


class RollingJacobiPolicy(JacobiPolicy):
    """Jacobi whose draft never shrinks: the n-token window rolls forward with every accepted token.

    Block Jacobi lets the draft shrink to the end of its block and then restarts from context-sampled
    guesses, so the first forward of every block gains about one token. Here the refreshed guesses move up
    after each forward and the window is topped up at its end, first with the prediction past the draft's
    last token (a real guess for that position), then with context samples. Only verified tokens are
    committed, so greedy output is still exactly greedy AR. Every forward carries n tokens (block Jacobi's
    carry fewer as its block converges): nearly free on a GPU, a cost per token on a CPU.
    """

    def advance(self, req: RequestState, verdict: Verdict, predictions: list[int]) -> None:
        refreshed = predictions[verdict.accepted :]  # guesses for the positions after the new head
        self.block_start = len(req.generated) - 1  # the window starts at the head
        self.tail = refreshed + req.context_sample(self.n - 1 - len(refreshed))


# Builders named in jf_ray.decoding.registry.
def ar(config: DecodeConfig) -> JacobiPolicy:
    return JacobiPolicy(block_size=1)


def jacobi(config: DecodeConfig) -> JacobiPolicy:
    return JacobiPolicy(config.block_size, record=config.record_trajectory)


def rolling(config: DecodeConfig) -> RollingJacobiPolicy:
    return RollingJacobiPolicy(config.block_size)

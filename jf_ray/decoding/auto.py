"""The load-aware decoder ``auto``: rolling Jacobi whose draft shape the engine sets before every forward.

The engine asks :func:`jf_ray.decoding.planner.plan_drafts` for every ``auto`` request's draft shape (window
length and recycled candidates), from the forward cost curve of its hardware (:func:`measure_cost_curve`, or
one loaded from a file) and each request's :class:`~jf_ray.decoding.gains.AcceptanceEstimate`. Only
verified tokens are committed, as in every Jacobi decoder, so greedy output is greedy AR and sampling keeps
the model's distribution whatever the shapes chosen. See docs/load-aware-decoding.md.
"""

from __future__ import annotations

import logging
import time

import torch

from jf_ray.decoding.cache import RaggedKVCache
from jf_ray.decoding.gains import AcceptanceEstimate
from jf_ray.decoding.jacobi import RollingJacobiPolicy
from jf_ray.decoding.multiblock import Recycler
from jf_ray.decoding.planner import CostCurve, DraftRow, DraftShape, candidate_widths
from jf_ray.decoding.query import Segment, build_query, prefill_query
from jf_ray.decoding.request import RequestState
from jf_ray.decoding.types import DecodeConfig
from jf_ray.modeling import attention_backends

logger = logging.getLogger(__name__)

MEASURED_CONTEXT = 32  # tokens already cached in every row while a forward is timed
MAX_MEASURED_BATCH = 64  # larger batches are extrapolated (proportionally: no free rows assumed)
PAST_THE_KNEE = 4.0  # a row of the grid stops being timed once a forward costs this many times its 1-wide one
SETTLING_FORWARDS = 2  # forwards after a window grows (or starts) that do not count towards its gain
# An answer's opening converges slowly whatever the window: on the embedded model, rolling windows of 4 to 32
# gained 1.0-1.3 tokens per forward over a request's first ten forwards, then 2-3.5. Counted, the opening was
# charged to whichever length was tried first (the longest: unmeasured lengths are tried on their promise), and
# windows of 16-32 were measured at 1.0-1.25 tokens where they gain 3 (docs/load-aware-decoding.md).
OPENING_FORWARDS = 12  # a request's forwards (its prefill included) that do not count towards any gain


class AutoPolicy(RollingJacobiPolicy):
    """Rolling Jacobi whose window length and recycled candidates the engine's planner sets before each forward.

    Candidates come from :class:`~jf_ray.decoding.multiblock.Recycler` (the context and a pool of rejected
    drafts, as in ``multiblock``); greedy keeps the one that accepts the most, sampling verifies them all in
    one distribution-exact walk.
    """

    def __init__(self, longest: int, max_candidates: int):
        super().__init__(longest)
        self.longest = longest
        self.max_candidates = max_candidates
        self.acceptance = AcceptanceEstimate()
        self.recycler = Recycler(max_candidates)
        self.candidates = 0  # candidates the plan allows in the next forward
        self.offered: list[list[int]] = []  # those draft_row found for this forward's draft
        self.num_candidates = 0  # candidates laid out in it
        self.settled = 0  # forwards since the window last grew (its new guesses are fresh: not yet refined)

    def draft_row(self, req: RequestState, with_candidates: bool = True) -> DraftRow:
        """What the planner may give this request: its acceptance, longest draft and candidates on offer now
        (none looked for without ``with_candidates``: the search costs Python time in every forward)."""
        longest = max(1, min(self.longest, req.budget))
        self._first_guesses(req)
        self.offered = []
        if with_candidates and longest > 1:
            self.offered = self.recycler.candidates(req, [req.head] + self.tail[: longest - 1], self.max_candidates)
        return DraftRow(self.acceptance, longest, len(self.offered))

    def resize(self, req: RequestState, shape: DraftShape) -> None:
        """Draft ``shape.length`` tokens (head included) and up to ``shape.candidates`` candidates next; a
        longer window is topped up with context samples, a shorter one keeps its first guesses."""
        self._first_guesses(req)
        if shape.length > self.n:
            self.settled = 0
        self.n, self.candidates = shape.length, shape.candidates
        if len(self.tail) < shape.length - 1:
            self.tail = self.tail + req.context_sample(shape.length - 1 - len(self.tail))

    def _first_guesses(self, req: RequestState) -> None:
        if self.tail is None:  # the first decoding forward: guesses for the longest window (resize cuts them)
            self.tail = req.context_sample(self.longest - 1)

    def plan(self, req: RequestState) -> list[Segment]:
        main = self.main_segment(req)
        if not self.candidates:
            candidates = []
        elif self.offered and len(self.offered[0]) >= len(main.tokens):  # found once per forward, cut to the draft
            candidates = [Segment(c, main.start_position) for c in cut_candidates(self.offered, main.tokens)]
        else:
            candidates = self.recycler.segments(req, main, self.candidates)
        candidates = candidates[: self.candidates]
        self.num_candidates = len(candidates)
        self.offered = []
        return [main, *candidates]

    def update(self, req: RequestState) -> None:
        if self.n == 1 and not self.num_candidates:  # an AR forward: nothing to judge, recycle or learn from
            self.settled += 1
            return super().update(req)
        judged = self.recycler.judge(req, self.num_candidates)
        settled = self.settled >= max(SETTLING_FORWARDS, self.n // 4)  # once its guesses are refined
        if settled and req.stats.forwards > OPENING_FORWARDS:
            self.acceptance.observe(len(req.segments[0].tokens), judged.main_accepted)
        self.settled += 1
        if self.num_candidates:
            extra = judged.verdict.accepted - judged.main_accepted
            self.acceptance.observe_candidates(self.num_candidates, extra)
        if not req.accept(judged.winner, judged.verdict):
            self.advance(req, judged.verdict, req.outputs[judged.winner].predictions)


def cut_candidates(candidates: list[list[int]], draft: list[int]) -> list[list[int]]:
    """``candidates`` of a draft at least as long as ``draft``, cut to its length: distinct, none equal to it."""
    cut: list[list[int]] = []
    for candidate in candidates:
        if candidate[: len(draft)] != draft and candidate[: len(draft)] not in cut:
            cut.append(candidate[: len(draft)])
    return cut


def auto(config: DecodeConfig) -> AutoPolicy:
    """Builder named in jf_ray.decoding.registry: drafts of at most ``block_size`` tokens, at most
    ``pool_size`` candidates."""
    return AutoPolicy(config.block_size, config.pool_size)


@torch.inference_mode()
def measure_cost_curve(model, max_batch: int, max_width: int, repeats: int = 3) -> CostCurve:
    """Time decoding forwards over a grid of batch sizes and query widths (powers of two) on this hardware.

    Each cell is the fastest of ``repeats`` forwards after one untimed one, every row holding
    ``MEASURED_CONTEXT`` cached tokens; the speculative slots are dropped after each forward. Once a width
    costs ``PAST_THE_KNEE`` times the 1-wide forward, wider ones are extrapolated in proportion to their
    tokens (which keeps the measurement short for a large model on a CPU). The grid is then made monotone
    by :func:`lower_envelope`.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch_sizes = candidate_widths(min(max_batch, MAX_MEASURED_BATCH))
    widths = candidate_widths(max_width)
    start, ms = time.perf_counter(), []
    for rows in batch_sizes:
        cache = RaggedKVCache(device, num_rows=rows)
        context = torch.randint(0, model.config.vocab_size, (rows, MEASURED_CONTEXT)).tolist()
        _forward(model, prefill_query(context, dtype, device), cache, device)
        cache.valid[:] = True
        row: list[float] = []
        for width in widths:
            if row and row[-1] > PAST_THE_KNEE * row[0]:  # compute-bound: the cost grows with the tokens
                row.append(row[-1] * width / widths[len(row) - 1])
            else:
                row.append(_time_width(model, cache, rows, width, repeats, dtype, device))
        ms.append(row)
    curve = CostCurve(batch_sizes, widths, lower_envelope(ms))
    logger.info("measured the forward cost curve in %.2fs: %s", time.perf_counter() - start, curve.to_dict())
    return curve


def lower_envelope(ms: list[list[float]]) -> list[list[float]]:
    """Each cell lowered to the cheapest cell with at least as many rows and tokens.

    A forward with more work is never cheaper, and on a shared machine timing noise only adds time, so the
    cheapest timing of any larger shape bounds a smaller shape's cost from above.
    """
    out = [row[:] for row in ms]
    for i in reversed(range(len(out))):
        for j in reversed(range(len(out[i]))):
            right = out[i][j + 1] if j + 1 < len(out[i]) else float("inf")
            below = out[i + 1][j] if i + 1 < len(out) else float("inf")
            out[i][j] = min(out[i][j], right, below)
    return out


def _time_width(model, cache: RaggedKVCache, rows: int, width: int, repeats: int, dtype, device) -> float:
    segments = [[Segment([1] * width, MEASURED_CONTEXT)] for _ in range(rows)]
    best = float("inf")
    for attempt in range(repeats + 1):
        query = build_query(segments, cache.valid, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        _forward(model, query, cache, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first forward of a shape is not timed (allocation, kernel choice)
            best = min(best, (time.perf_counter() - begin) * 1000.0)
        cache.crop_tail()
    return best


def _forward(model, query, cache: RaggedKVCache, device) -> None:
    with attention_backends(device):
        model(
            input_ids=query.input_ids,
            position_ids=query.position_ids,
            attention_mask=query.attention_mask,
            past_key_values=cache.kv,
            use_cache=True,
        )
    cache.extend_slots(query.input_ids.shape[1])

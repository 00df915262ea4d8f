"""The load-aware planner: how long a draft each request gets in the next forward (docs/load-aware-decoding.md).

Pure and torch-free. A forward's cost depends on its rows and on its query width (every row is padded to the
widest), and is read from a :class:`CostCurve` measured on the hardware. A request's gain from a draft of
length L is its expected accepted tokens per forward, from an :class:`AcceptanceEstimate` of its recent
forwards. :func:`plan_drafts` tries every width and keeps the one with the most expected tokens per second
for the whole batch: alone, width is nearly free and drafts are long; as rows are added the cost of width
grows and drafts shorten; where the curve says width costs as much as it gains, every draft is 1 token (AR).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

PRIOR_ACCEPTANCE = 0.6  # per-token acceptance assumed for a request with no history (see the docs)
DECAY = 0.8  # weight of the past in the exponential averages: about the last five forwards count


def _interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise linear in ``x``; beyond the last point, proportional to ``x`` (no free width assumed)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class CostCurve:
    """Milliseconds of one decoding forward with ``rows`` requests of ``width`` query tokens each."""

    batch_sizes: list[int]
    widths: list[int]
    ms: list[list[float]]  # ms[i][j]: batch_sizes[i] rows of widths[j] tokens

    def __post_init__(self) -> None:
        if len(self.ms) != len(self.batch_sizes) or any(len(row) != len(self.widths) for row in self.ms):
            raise ValueError("cost curve: ms must have one row per batch size and one column per width")
        if sorted(set(self.batch_sizes)) != self.batch_sizes or sorted(set(self.widths)) != self.widths:
            raise ValueError("cost curve: batch_sizes and widths must be increasing")

    def cost_ms(self, rows: int, width: int) -> float:
        by_batch = [_interpolate(self.widths, row, width) for row in self.ms]
        return _interpolate(self.batch_sizes, by_batch, rows)

    def to_dict(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "widths": self.widths, "ms": self.ms}

    @classmethod
    def from_dict(cls, data: dict) -> CostCurve:
        return cls(list(data["batch_sizes"]), list(data["widths"]), [list(map(float, r)) for r in data["ms"]])


@dataclass
class AcceptanceEstimate:
    """Recent acceptance of one request, as the probability ``p`` that a drafted token is accepted.

    ``p`` is the ratio of exponential averages of matched and of examined draft tokens per forward (a draft
    token is examined when every token before it matched), so a forward with any draft length informs every
    length. A draft of L tokens (head included) is then expected to gain ``1 + p + ... + p^(L-1)`` tokens: a
    geometric model, increasing in L with diminishing returns.
    """

    matched: float = PRIOR_ACCEPTANCE
    examined: float = 1.0

    @property
    def p(self) -> float:
        return min(self.matched / self.examined, 0.99) if self.examined > 0 else PRIOR_ACCEPTANCE

    def expected(self, length: int) -> float:
        p = self.p
        return (1.0 - p**length) / (1.0 - p)

    def observe(self, length: int, accepted: int) -> None:
        """One forward with a draft of ``length`` tokens (head included) that gained ``accepted`` tokens."""
        matched = accepted - 1
        examined = matched + (1 if accepted < length else 0)
        self.matched = DECAY * self.matched + (1 - DECAY) * matched
        self.examined = DECAY * self.examined + (1 - DECAY) * examined


@dataclass
class DraftPlan:
    lengths: list[int]  # draft length (head included) of every load-aware row, in order
    width: int  # query tokens per row of the forward (rows are padded to it)
    expected_tokens_per_s: float


def candidate_widths(longest: int) -> list[int]:
    """1, 2, 4, ... up to ``longest``, and ``longest`` itself."""
    widths, w = [], 1
    while w < longest:
        widths.append(w)
        w *= 2
    return widths + [longest]


def plan_drafts(
    curve: CostCurve,
    rows: Sequence[tuple[AcceptanceEstimate, int]],
    fixed_rows: int = 0,
    fixed_width: int = 1,
    overhead_ms: float = 0.0,
) -> DraftPlan:
    """Draft lengths for the load-aware ``rows`` (acceptance, longest draft allowed) that maximise the batch's
    expected tokens per second.

    ``fixed_rows`` other requests share the forward with a query of up to ``fixed_width`` tokens (counted as one
    token gained each); ``overhead_ms`` is the engine's own time per step outside the model.
    """
    if not rows:
        raise ValueError("plan_drafts needs at least one load-aware row")
    batch = len(rows) + fixed_rows
    best: DraftPlan | None = None
    for width in candidate_widths(max(cap for _, cap in rows)):
        lengths = [max(1, min(width, cap)) for _, cap in rows]
        tokens = fixed_rows + sum(acceptance.expected(n) for (acceptance, _), n in zip(rows, lengths))
        seconds = (curve.cost_ms(batch, max(width, fixed_width)) + overhead_ms) / 1000.0
        rate = tokens / seconds if seconds > 0 else float("inf")
        if best is None or rate > best.expected_tokens_per_s:
            best = DraftPlan(lengths, max(lengths), rate)
    return best

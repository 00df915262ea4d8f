"""The load-aware planner: what each request drafts in the next forward (docs/load-aware-decoding.md).

Pure and torch-free. A forward's cost depends on its rows and on its query width (every row is padded to the
widest), and is read from a :class:`CostCurve` measured on the hardware. A request's :class:`DraftShape` is
its main draft's length and the number of recycled candidates verified beside it; its gain is the expected
accepted tokens per forward, from an :class:`AcceptanceEstimate` of its recent forwards. :func:`plan_drafts`
tries every width and keeps the one with the most expected tokens per second for the whole batch: alone,
width is nearly free and drafts are long, with every candidate on offer; as rows are added the cost of width
grows and shapes shrink; where the curve says width costs as much as it gains, every draft is 1 token (AR).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

PRIOR_ACCEPTANCE = 0.6  # per-token acceptance assumed for a request with no history (see the docs)
PRIOR_RECYCLED = 0.5  # tokens one recycled candidate is assumed to add beyond the main draft, with no history
DECAY = 0.8  # weight of the past in a request's exponential averages: about its last five forwards count
CALIBRATION_DECAY = 0.98  # the engine-wide length calibration: about the last fifty windows of a length
MAX_CALIBRATION = 4.0  # the calibration scales the geometric model's gain by at most this (or 1/this)
OVERHEAD_DECAY = 0.95  # the step overhead fit: about the last twenty steps


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


@dataclass(frozen=True)
class DraftShape:
    """What one request puts into a forward: a main draft of ``length`` tokens (head included) and
    ``candidates`` recycled candidates of the same length verified beside it (docs/load-aware-decoding.md)."""

    length: int
    candidates: int = 0

    @property
    def width(self) -> int:
        return self.length * (1 + self.candidates)


def harmonic(count: int) -> float:
    """1 + 1/2 + ... + 1/count: the k-th candidate is expected to add 1/k of what the first adds."""
    return sum(1.0 / k for k in range(1, count + 1))


def menu_length(length: int) -> int:
    """The window length ``length`` is counted under: the largest power of two not above it."""
    return 1 << (max(1, length).bit_length() - 1)


@dataclass
class LengthCalibration:
    """How much more (or less) than the geometric model windows of each length gain, over every ``auto`` request
    of one engine (one model): the geometric model knows nothing of Jacobi's long runs, where tokens past the
    first mismatch keep converging over later forwards, so a long window may gain far more than ``p`` predicts.

    Per menu length (:func:`menu_length`), the ratio of exponential averages of the tokens gained beyond the
    head and of those the model predicted. A length not drafted yet borrows the nearest drafted length's ratio,
    so a heavy tail seen at 8 makes 16 worth trying, and the trial then measures 16 itself.
    """

    gained: dict[int, float] = field(default_factory=dict)
    predicted: dict[int, float] = field(default_factory=dict)

    def observe(self, length: int, predicted: float, accepted: int) -> None:
        key = menu_length(length)
        if key == 1:  # a 1-token draft gains exactly the head: nothing to calibrate
            return
        self.gained[key] = CALIBRATION_DECAY * self.gained.get(key, 0.0) + (accepted - 1)
        self.predicted[key] = CALIBRATION_DECAY * self.predicted.get(key, 0.0) + max(predicted - 1, 1e-3)

    def factor(self, length: int) -> float:
        if not self.gained:
            return 1.0
        key = min(self.gained, key=lambda k: (abs(k.bit_length() - menu_length(length).bit_length()), k))
        return min(max(self.gained[key] / self.predicted[key], 1 / MAX_CALIBRATION), MAX_CALIBRATION)


@dataclass
class AcceptanceEstimate:
    """Recent acceptance of one request, for both shape families: the window and its recycled candidates.

    ``p`` is the probability that a drafted token is accepted: the ratio of exponential averages of matched and
    of examined draft tokens per forward (a draft token is examined when every token before it matched), so a
    forward with any draft length informs every length. A draft of L tokens (head included) is then expected
    to gain ``1 + p + ... + p^(L-1)`` tokens (a geometric model, increasing in L with diminishing returns),
    the part beyond the head scaled by the engine's :class:`LengthCalibration` for L when there is one.

    ``recycled`` is the exponential average of the tokens the best of a forward's candidates gained beyond the
    main draft, per unit of ``harmonic(candidates)``: ``c`` candidates are expected to add
    ``recycled * harmonic(c)``. It learns only from forwards that verified candidates.
    """

    matched: float = PRIOR_ACCEPTANCE
    examined: float = 1.0
    recycled: float = PRIOR_RECYCLED
    calibration: LengthCalibration | None = None  # shared by the engine's auto requests

    @property
    def p(self) -> float:
        return min(self.matched / self.examined, 0.99) if self.examined > 0 else PRIOR_ACCEPTANCE

    def geometric(self, length: int) -> float:
        """The geometric model's expected gain of a ``length``-token window, uncalibrated."""
        p = self.p
        return (1.0 - p**length) / (1.0 - p)

    def expected(self, length: int, candidates: int = 0) -> float:
        """Expected tokens gained by a forward with this shape; never more than ``length`` (the winner's)."""
        window = self.geometric(length)
        if self.calibration is not None:
            window = 1.0 + (window - 1.0) * self.calibration.factor(length)
        return min(float(length), window + self.recycled * harmonic(candidates))

    def observe(self, length: int, accepted: int) -> None:
        """One forward with a draft of ``length`` tokens (head included) that gained ``accepted`` tokens."""
        if self.calibration is not None:
            self.calibration.observe(length, self.geometric(length), accepted)
        matched = accepted - 1
        examined = matched + (1 if accepted < length else 0)
        self.matched = DECAY * self.matched + (1 - DECAY) * matched
        self.examined = DECAY * self.examined + (1 - DECAY) * examined

    def observe_candidates(self, candidates: int, extra: int) -> None:
        """One forward whose ``candidates`` verified candidates gained ``extra`` tokens beyond the main draft."""
        self.recycled = DECAY * self.recycled + (1 - DECAY) * extra / harmonic(candidates)


@dataclass
class StepOverhead:
    """A decoding step's time outside the model: ``fixed_ms + per_token_ms * tokens`` committed in the step.

    Fitted by exponentially weighted least squares over recent steps. Per-token work (verifying, detokenizing,
    streaming) grows with what a wide draft commits, so only the fixed part rewards fewer, wider steps; while
    the tokens per step do not vary the fit cannot split the two and counts it all as fixed.
    """

    weight: float = 0.0
    tokens: float = 0.0
    tokens_sq: float = 0.0
    ms: float = 0.0
    tokens_ms: float = 0.0

    def observe(self, tokens: int, ms: float) -> None:
        d = OVERHEAD_DECAY
        self.weight = d * self.weight + 1.0
        self.tokens = d * self.tokens + tokens
        self.tokens_sq = d * self.tokens_sq + tokens * tokens
        self.ms = d * self.ms + ms
        self.tokens_ms = d * self.tokens_ms + tokens * ms

    @property
    def per_token_ms(self) -> float:
        if self.weight == 0:
            return 0.0
        mean_t, mean_ms = self.tokens / self.weight, self.ms / self.weight
        variance = self.tokens_sq / self.weight - mean_t**2
        if variance < 1e-6:
            return 0.0
        slope = (self.tokens_ms / self.weight - mean_t * mean_ms) / variance
        return min(max(slope, 0.0), mean_ms / max(mean_t, 1e-9))  # neither negative nor above the whole cost

    @property
    def fixed_ms(self) -> float:
        if self.weight == 0:
            return 0.0
        return max(0.0, (self.ms - self.per_token_ms * self.tokens) / self.weight)

    def step_ms(self, tokens: float) -> float:
        return self.fixed_ms + self.per_token_ms * tokens


@dataclass
class DraftRow:
    """What the planner may give one load-aware request in the next forward."""

    acceptance: AcceptanceEstimate
    longest: int  # longest main draft allowed (its block size, cut to its remaining token budget)
    candidates: int = 0  # recycled candidates it has on offer now (0 when none matches its head)

    @property
    def widest(self) -> int:
        return self.longest * (1 + self.candidates)

    def best_shape(self, width: int) -> DraftShape:
        """The shape of most expected tokens within ``width`` query tokens (fewer candidates on ties)."""
        best = DraftShape(max(1, min(width, self.longest)))
        for candidates in range(1, self.candidates + 1):
            length = min(width // (1 + candidates), self.longest)
            if length < 2:  # a 1-token candidate is the head itself
                break
            shape = DraftShape(length, candidates)
            if self.acceptance.expected(length, candidates) > self.acceptance.expected(best.length, best.candidates):
                best = shape
        return best


@dataclass
class DraftPlan:
    shapes: list[DraftShape]  # shape of every load-aware row, in order
    width: int  # query tokens per row of the forward (rows are padded to it)
    expected_tokens_per_s: float

    @property
    def lengths(self) -> list[int]:
        return [shape.length for shape in self.shapes]


def candidate_widths(longest: int) -> list[int]:
    """1, 2, 4, ... up to ``longest``, and ``longest`` itself."""
    widths, w = [], 1
    while w < longest:
        widths.append(w)
        w *= 2
    return widths + [longest]


def plan_drafts(
    curve: CostCurve,
    rows: Sequence[DraftRow],
    fixed_rows: int = 0,
    fixed_width: int = 1,
    overhead: StepOverhead | None = None,
) -> DraftPlan:
    """Draft shapes for the load-aware ``rows`` that maximise the batch's expected tokens per second.

    Every row is padded to the forward's width, so for each candidate width each row takes its best shape
    that fits in it, and the width of highest value wins (ties go to the narrower one). ``fixed_rows`` other
    requests share the forward with a query of up to ``fixed_width`` tokens (counted as one token gained
    each); ``overhead`` is the step's time outside the model, fixed and per token committed.
    """
    if not rows:
        raise ValueError("plan_drafts needs at least one load-aware row")
    overhead = overhead or StepOverhead()
    batch = len(rows) + fixed_rows
    best: DraftPlan | None = None
    for width in candidate_widths(max(row.widest for row in rows)):
        shapes = [row.best_shape(width) for row in rows]
        tokens = fixed_rows + sum(row.acceptance.expected(s.length, s.candidates) for row, s in zip(rows, shapes))
        forward_width = max(fixed_width, *(shape.width for shape in shapes))
        seconds = (curve.cost_ms(batch, forward_width) + overhead.step_ms(tokens)) / 1000.0
        rate = tokens / seconds if seconds > 0 else float("inf")
        if best is None or rate > best.expected_tokens_per_s:
            best = DraftPlan(shapes, max(shape.width for shape in shapes), rate)
    return best

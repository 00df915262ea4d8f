"""The load-aware planner: what each request drafts in the next forward (docs/load-aware-decoding.md).

Pure and torch-free. A forward's cost depends on its rows and on its query width (every row is padded to the
widest), and is read from a :class:`CostCurve` measured on the hardware. A request's :class:`DraftShape` is
its main draft's length and the number of recycled candidates verified beside it; its gain is the expected
accepted tokens per forward, from an :class:`AcceptanceEstimate` of its recent forwards. :func:`plan_drafts`
keeps the width with the most expected tokens per second for the whole batch.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from jf_ray.decoding.gains import AcceptanceEstimate, menu_length

EXPLORING_COST = 2.0  # unmeasured window lengths are valued on their promise where a step costs at most this x AR's
COST_DECAY = 0.95  # the served-forward correction of the cost curve: about the last twenty forwards of a cell
MAX_COST_RATIO = 4.0  # measured forwards raise the curve by at most this factor
HYSTERESIS = 0.15  # a new width must promise this much more than the last one to replace it
OVERHEAD_DECAY = 0.98  # the step overhead fit: about the last fifty steps
RIDGE = 1e-3  # relative ridge of the overhead fit
STEADY_TOKENS = 0.1  # tokens per step varying by less than this (coefficient of variation) do not identify the fit


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
    _memo: dict[tuple[int, int], float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ms) != len(self.batch_sizes) or any(len(row) != len(self.widths) for row in self.ms):
            raise ValueError("cost curve: ms must have one row per batch size and one column per width")
        if sorted(set(self.batch_sizes)) != self.batch_sizes or sorted(set(self.widths)) != self.widths:
            raise ValueError("cost curve: batch_sizes and widths must be increasing")

    def cost_ms(self, rows: int, width: int) -> float:
        if (rows, width) not in self._memo:  # asked for the same few cells at every step
            by_batch = [_interpolate(self.widths, row, width) for row in self.ms]
            self._memo[rows, width] = _interpolate(self.batch_sizes, by_batch, rows)
        return self._memo[rows, width]

    def to_dict(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "widths": self.widths, "ms": self.ms}

    @classmethod
    def from_dict(cls, data: dict) -> CostCurve:
        return cls(list(data["batch_sizes"]), list(data["widths"]), [list(map(float, r)) for r in data["ms"]])


@dataclass
class ObservedCosts:
    """The cost curve corrected by the decoding forwards timed since: per cell (rows and width, each rounded
    down to a power of two) the ratio of the exponentially weighted sums of the measured and of the curve's
    milliseconds, between 1 and 4: served forwards run on longer contexts than the start-up timing, beside a
    proxy and an event loop, and cost more; a quiet moment does not make width look cheaper than the start-up
    measurement, which kept the fastest of several.
    """

    curve: CostCurve
    measured: dict[tuple[int, int], float] = field(default_factory=dict)
    predicted: dict[tuple[int, int], float] = field(default_factory=dict)
    _memo: dict[tuple[int, int], float] = field(default_factory=dict, repr=False, compare=False)  # until observe

    def observe(self, rows: int, width: int, ms: float) -> None:
        self._memo.clear()
        cell = (menu_length(rows), menu_length(width))
        self.measured[cell] = COST_DECAY * self.measured.get(cell, 0.0) + ms
        self.predicted[cell] = COST_DECAY * self.predicted.get(cell, 0.0) + self.curve.cost_ms(rows, width)

    def ratio(self, rows: int, width: int) -> float:
        """The cell's correction; a cell not timed yet borrows the nearest timed cell's (in doublings of rows and
        width; the smaller on ties), else 1: what raised one cell's cost (long contexts, a busy machine) raises
        its neighbours' (docs/load-aware-decoding.md)."""
        cell = (menu_length(rows), menu_length(width))
        if cell not in self.measured:
            if not self.measured:
                return 1.0
            cell = min(self.measured, key=lambda timed: (_doublings(timed, cell), self._raw(timed)))
        return min(max(self._raw(cell), 1.0), MAX_COST_RATIO)

    def _raw(self, cell: tuple[int, int]) -> float:
        return self.measured[cell] / self.predicted[cell]

    def cost_ms(self, rows: int, width: int) -> float:
        if (rows, width) not in self._memo:  # a plan asks for each cell several times
            self._memo[rows, width] = self.curve.cost_ms(rows, width) * self.ratio(rows, width)
        return self._memo[rows, width]


def _doublings(a: tuple[int, int], b: tuple[int, int]) -> int:
    """How many doublings of rows and width apart two cells (powers of two) are."""
    return sum(abs(x.bit_length() - y.bit_length()) for x, y in zip(a, b))


@dataclass(frozen=True)
class DraftShape:
    """What one request puts into a forward: a main draft of ``length`` tokens (head included) and
    ``candidates`` recycled candidates of the same length verified beside it (docs/load-aware-decoding.md)."""

    length: int
    candidates: int = 0

    @property
    def width(self) -> int:
        return self.length * (1 + self.candidates)


@dataclass
class StepOverhead:
    """A decoding step's time outside the model: ``fixed_ms + per_query_ms * query + per_token_ms * tokens``,
    with ``query`` the step's query tokens (rows x width: building the query, verifying every draft token) and
    ``tokens`` the tokens it committed (detokenizing and streaming them, in a server).

    Exponentially weighted least squares over about the last fifty steps, with a little ridge. While the tokens
    per step hardly vary (a batch held at AR), fixed and per-token time cannot be told apart and all of it counts
    per token: read as fixed, a server's streaming time made wider steps look cheap. Only the fixed part
    rewards fewer, wider steps (docs/load-aware-decoding.md).
    """

    sums: list[float] = field(default_factory=lambda: [0.0] * 10)  # w, q, t, y, qq, qt, tt, qy, ty, yy
    _fitted: tuple[float, float, float] | None = field(default=None, repr=False, compare=False)  # until observe

    def observe(self, query: int, tokens: int, ms: float) -> None:
        terms = (1.0, query, tokens, ms, query * query, query * tokens, tokens * tokens, query * ms, tokens * ms)
        self.sums = [OVERHEAD_DECAY * s + x for s, x in zip(self.sums, (*terms, ms * ms))]
        self._fitted = None

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(fixed_ms, per_query_ms, per_token_ms), none negative."""
        if self._fitted is None:
            self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> tuple[float, float, float]:
        w, q, t, y, qq, qt, tt, qy, ty, _ = self.sums
        if w == 0:
            return 0.0, 0.0, 0.0
        mq, mt, my = q / w, t / w, y / w
        vqq, vqt, vtt = qq / w - mq * mq, qt / w - mq * mt, tt / w - mt * mt
        if vtt < (STEADY_TOKENS * mt) ** 2:  # a batch held at AR: nothing tells fixed from per-token time
            return 0.0, 0.0, my / mt if mt > 0 else 0.0
        cqy, cty = qy / w - mq * my, ty / w - mt * my
        vqq, vtt = vqq + RIDGE * (1 + vqq), vtt + RIDGE * (1 + vtt)
        det = vqq * vtt - vqt * vqt
        per_query = max(0.0, (cqy * vtt - cty * vqt) / det)
        per_token = max(0.0, (cty * vqq - cqy * vqt) / det)
        return max(0.0, my - per_query * mq - per_token * mt), per_query, per_token

    def step_ms(self, query: float, tokens: float) -> float:
        fixed, per_query, per_token = self.coefficients
        return fixed + per_query * query + per_token * tokens


@dataclass
class DraftRow:
    """What the planner may give one load-aware request in the next forward."""

    acceptance: AcceptanceEstimate
    longest: int  # longest main draft allowed (its block size, cut to its remaining token budget)
    candidates: int = 0  # recycled candidates it has on offer now (0 when none matches its head)
    _memo: dict[tuple[int, int, bool], float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def widest(self) -> int:
        return self.longest * (1 + self.candidates)

    def best_shape(self, width: int, explore: bool = True) -> tuple[DraftShape, float]:
        """The shape of most expected tokens within ``width`` query tokens (fewer candidates on ties), and
        those tokens; unmeasured window lengths valued optimistically with ``explore``."""
        best = DraftShape(max(1, min(width, self.longest)))
        value = self.expected(best.length, 0, explore)
        for candidates in range(1, self.candidates + 1):
            length = min(width // (1 + candidates), self.longest)
            if length < 2:  # a 1-token candidate is the head itself
                break
            gain = self.expected(length, candidates, explore)
            if gain > value:
                best, value = DraftShape(length, candidates), gain
        return best, value

    def expected(self, length: int, candidates: int, explore: bool) -> float:
        """The acceptance estimate's value, remembered: a plan asks for the same shapes at many widths."""
        key = (length, candidates, explore)
        if key not in self._memo:
            self._memo[key] = self.acceptance.expected(length, candidates, explore)
        return self._memo[key]


@dataclass
class DraftPlan:
    shapes: list[DraftShape]  # shape of every load-aware row, in order
    width: int  # query tokens per row of the forward (rows are padded to it)
    expected_tokens_per_s: float
    menu_width: int = 0  # the candidate width it was planned for (the next plan's ``keep``)

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
    curve: CostCurve | ObservedCosts,
    rows: Sequence[DraftRow],
    fixed_rows: int = 0,
    fixed_width: int = 1,
    overhead: StepOverhead | None = None,
    keep: int | None = None,
) -> DraftPlan:
    """Draft shapes for the load-aware ``rows`` that maximise the batch's expected tokens per second.

    Every row is padded to the forward's width, so for each candidate width each row takes its best shape
    that fits in it, and the width of highest value wins (ties go to the narrower one). ``fixed_rows`` other
    requests share the forward with a query of up to ``fixed_width`` tokens (counted as one token gained
    each); ``overhead`` is the step's time outside the model (fixed, per query token and per token committed).
    ``keep``, the last plan's candidate width, stays unless another width is worth ``HYSTERESIS`` more: a
    window that changes length loses part of what its guesses had converged to. AR wins without the margin.
    """
    if not rows:
        raise ValueError("plan_drafts needs at least one load-aware row")
    overhead = overhead or StepOverhead()
    batch = len(rows) + fixed_rows

    def step_ms(forward_width: int) -> float:  # a whole step's time, the step outside the model included
        return curve.cost_ms(batch, forward_width) + overhead.step_ms(batch * forward_width, batch)

    def rate(tokens: float, forward_width: int) -> float:
        seconds = (curve.cost_ms(batch, forward_width) + overhead.step_ms(batch * forward_width, tokens)) / 1000.0
        return tokens / seconds if seconds > 0 else float("inf")

    ar_step_ms = step_ms(fixed_width)
    plans: dict[int, DraftPlan] = {}
    ceiling = _gain_ceiling(rows)
    longest = max(row.longest for row in rows)
    for width in candidate_widths(max(row.widest for row in rows)):
        if plans and ceiling is not None:  # cheap bound first: at saturation no row is looked at twice
            forward_width = max(fixed_width, min(width, longest))
            if rate(fixed_rows + ceiling(width), forward_width) <= plans[1].expected_tokens_per_s:
                continue
        if width == 1:  # AR: every row's head, one token each
            best_shapes = [(DraftShape(1), 1.0)] * len(rows)
        else:  # unmeasured lengths are tried on their promise only where trying costs little (GainTable)
            explore = step_ms(max(fixed_width, width)) <= EXPLORING_COST * ar_step_ms
            best_shapes = [row.best_shape(width, explore) for row in rows]
        shapes = [shape for shape, _ in best_shapes]
        tokens = fixed_rows + sum(value for _, value in best_shapes)
        forward_width = max(fixed_width, *(shape.width for shape in shapes))
        plans[width] = DraftPlan(shapes, max(shape.width for shape in shapes), rate(tokens, forward_width), width)
    best = max(plans.values(), key=lambda plan: plan.expected_tokens_per_s)  # the first, narrowest, on ties
    kept = plans.get(keep) if keep is not None and best.menu_width > 1 else None  # AR needs no margin
    if kept is None or kept.expected_tokens_per_s <= plans[1].expected_tokens_per_s:
        return best  # nor is a width kept that does not beat AR (the bound above may have skipped it)
    return kept if best.expected_tokens_per_s < (1 + HYSTERESIS) * kept.expected_tokens_per_s else best


def _gain_ceiling(rows: Sequence[DraftRow]):
    """An upper bound of the rows' summed expected tokens at each width, in O(1) per width once the rows are
    summed; ``None`` when a row has candidates on offer (their gain is not bounded this way).

    Without candidates a row's shape at width ``w`` is a window of ``L = min(w, longest)`` tokens, gaining
    ``1 + (g(L) - 1) * scale``: at most ``1 + (G(w) - 1) * scale`` with ``G(w)`` the table's largest gain at
    any length up to ``w`` (piecewise linear between powers of two, so the largest at one of those or at ``w``).
    A plan's rate ``T / (a + b T)`` grows with its tokens ``T``, so a width whose bound does not beat AR's
    rate cannot win, and is skipped.
    """
    if any(row.candidates for row in rows):
        return None
    tables = {id(row.acceptance.table): row.acceptance.table for row in rows}
    if len(tables) != 1:
        return None
    [table] = tables.values()
    scales = sum(row.acceptance.scale for row in rows)

    def ceiling(width: int) -> float:
        largest = max(table.gain(length) for length in (*candidate_widths(width), width))
        return len(rows) + max(0.0, largest - 1.0) * scales

    return ceiling

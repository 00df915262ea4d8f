"""The load-aware planner is a pure function of (cost curve, acceptance, batch): its choices, checked alone."""

from __future__ import annotations

import pytest

from jf_ray.decoding.gains import AcceptanceEstimate
from jf_ray.decoding.planner import CostCurve, DraftRow, DraftShape, plan_drafts

BATCHES, WIDTHS = [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64]


def curve(ms_of) -> CostCurve:
    return CostCurve(BATCHES, WIDTHS, [[ms_of(b, w) for w in WIDTHS] for b in BATCHES])


def knee(tokens: int) -> float:
    """A roofline-like curve: flat up to ``tokens`` query tokens per forward, then proportional to them."""
    return lambda b, w: 10.0 * max(1.0, b * w / tokens)


def fixed_overhead(ms: float):
    """A step overhead fitted on steps that committed 16-64 tokens, all of them ``ms`` outside the model."""
    from jf_ray.decoding.planner import StepOverhead

    overhead = StepOverhead()
    for tokens in (16, 32, 64) * 5:
        overhead.observe(2 * tokens, tokens, ms)
    return overhead


def good_rows(count: int, longest: int = 64, candidates: int = 0) -> list[DraftRow]:
    rows = []
    for _ in range(count):
        estimate = AcceptanceEstimate()
        for _ in range(20):  # a request that accepts 4 tokens of every 8-token draft
            estimate.observe(8, 4)
        rows.append(DraftRow(estimate, longest, candidates))
    return rows


def test_alone_it_drafts_long():
    plan = plan_drafts(curve(knee(64)), good_rows(1))
    assert plan.lengths == [64] and plan.width == 64


def test_drafts_shorten_as_rows_are_added():
    widths = [plan_drafts(curve(knee(64)), good_rows(rows)).width for rows in (1, 2, 4, 8, 16)]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert widths[-1] <= 8


def test_ar_when_width_is_not_free():
    proportional = curve(lambda b, w: 1.0 * b * w)  # every query token costs the same: no idle parallelism
    for rows in (1, 4, 16):
        plan = plan_drafts(proportional, good_rows(rows))
        assert plan.lengths == [1] * rows


def test_ar_at_saturation_and_for_requests_that_accept_nothing():
    assert plan_drafts(curve(knee(16)), good_rows(16)).width == 1
    hopeless = AcceptanceEstimate()
    for _ in range(30):
        for length in (2, 4, 8, 16, 32, 64):  # every length tried: none left to explore
            hopeless.observe(length, 1)
    assert plan_drafts(curve(lambda b, w: 10.0 + 0.01 * b * w), [DraftRow(hopeless, 64)]).width == 1


def test_caps_and_fixed_rows():
    plan = plan_drafts(curve(knee(64)), good_rows(2, longest=5))
    assert plan.lengths == [5, 5] and plan.shapes == [DraftShape(5)] * 2
    # Another request already makes the forward 32 wide: the auto row may use that width for free.
    shared = plan_drafts(curve(knee(16)), good_rows(1), fixed_rows=1, fixed_width=32)
    assert shared.width >= 32


def test_free_width_alone_takes_the_biggest_shape():
    free = curve(lambda b, w: 10.0)  # beyond the grid (64 tokens) the cost grows in proportion
    plan = plan_drafts(free, good_rows(1, longest=16, candidates=3))
    assert plan.shapes == [DraftShape(16, 3)] and plan.width == 64
    # Wider than the grid costs more: 32 tokens and 3 candidates (128 wide) lose to a 64-wide shape.
    assert plan_drafts(free, good_rows(1, longest=32, candidates=3)).width == 64


def test_width_that_costs_what_it_gains_is_ar_even_with_candidates():
    proportional = curve(lambda b, w: 1.0 * b * w)
    for rows in (1, 4, 16):
        rich = good_rows(rows, candidates=4)
        for row in rich:
            for _ in range(20):  # candidates that always win many tokens
                row.acceptance.observe_candidates(4, 6)
        assert plan_drafts(proportional, rich).shapes == [DraftShape(1)] * rows


def test_shapes_shrink_as_rows_are_added():
    plans = [plan_drafts(curve(knee(64)), good_rows(rows, longest=16, candidates=3)) for rows in (1, 4, 16)]
    assert plans[0].shapes == [DraftShape(16, 3)]  # 64 tokens: up to the knee
    assert [p.width for p in plans] == sorted((p.width for p in plans), reverse=True) and plans[-1].width <= 4
    assert all(shape.candidates == 0 for shape in plans[-1].shapes)


def test_candidates_only_where_offered_and_while_they_pay():
    nearly_free = curve(lambda b, w: 10.0 + 0.01 * b * w)
    estimate = AcceptanceEstimate()
    assert plan_drafts(nearly_free, [DraftRow(estimate, 8, 0)]).shapes == [DraftShape(8)]  # none offered
    assert plan_drafts(nearly_free, [DraftRow(estimate, 8, 2)]).shapes == [DraftShape(8, 2)]
    assert DraftRow(estimate, 8, 2).best_shape(3)[0] == DraftShape(3)  # no room for a 2-token draft and a candidate
    for _ in range(30):
        estimate.observe_candidates(2, 0)  # candidates that never win
    assert estimate.recycled < 0.01
    assert plan_drafts(nearly_free, [DraftRow(estimate, 8, 2)]).shapes == [DraftShape(8)]
    assert estimate.expected(4, 100) <= 4  # never more than the draft's length


def test_acceptance_estimate_learns():
    estimate = AcceptanceEstimate()
    for _ in range(30):
        estimate.observe(16, 16)
    assert estimate.expected(16) > 14
    for _ in range(60):
        estimate.observe(16, 1)
    # the request's own estimate falls at once; the model-wide table (about 50 windows) more slowly
    assert estimate.scale == pytest.approx(0.25) and estimate.expected(16) < 2.0 < estimate.table.gain(16)


def test_cost_curve_interpolates_and_round_trips():
    c = curve(lambda b, w: float(b * w))
    assert c.cost_ms(3, 3) == pytest.approx(9.0, rel=0.2)
    assert c.cost_ms(32, 64) == pytest.approx(2048.0)  # beyond the grid: proportional
    assert CostCurve.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="increasing"):
        CostCurve([2, 1], [1], [[1.0], [1.0]])


def test_step_overhead_fit_splits_fixed_per_query_and_per_token_time():
    from jf_ray.decoding.planner import StepOverhead

    fit = StepOverhead()
    for query, tokens in [(1, 1), (32, 4), (16, 9), (4, 2), (64, 16), (8, 7)] * 20:
        fit.observe(query, tokens, 5.0 + 0.1 * query + 0.5 * tokens)
    fixed, per_query, per_token = fit.coefficients
    assert (fixed, per_query, per_token) == pytest.approx((5.0, 0.1, 0.5), abs=0.05)
    assert fit.step_ms(10, 10) == pytest.approx(11.0, abs=0.1)
    steady = StepOverhead()
    for rows in [60, 64, 62, 64] * 10:  # a batch held at AR: about one token per row per step
        steady.observe(rows, rows, 12.0)
    assert steady.coefficients == pytest.approx((0.0, 0.0, 12.0 / 62.5), rel=0.01)  # all of it per token


def test_overhead_per_token_or_per_query_rewards_width_less_than_a_fixed_one():
    from jf_ray.decoding.planner import StepOverhead

    fixed, per_token, per_query = StepOverhead(), StepOverhead(), StepOverhead()
    for query, tokens in [(4, 1), (8, 2), (16, 3), (32, 4)] * 10:
        fixed.observe(query, tokens, 40.0)
        per_token.observe(query, tokens, 10.0 * tokens)  # detokenizing and streaming: each token costs 10 ms
        per_query.observe(query, tokens, 2.0 * query)  # verifying: each query token costs 2 ms
    proportional = curve(lambda b, w: 2.0 * b * w)
    assert plan_drafts(proportional, good_rows(4), overhead=fixed).width > 1  # fewer, wider steps pay less of it
    assert plan_drafts(proportional, good_rows(4), overhead=per_token).width == 1
    assert plan_drafts(proportional, good_rows(4), overhead=per_query).width == 1


def test_gain_table_values_each_length_by_what_it_gained():
    from jf_ray.decoding.gains import GainTable

    table = GainTable()
    assert table.gain(8) == pytest.approx(5.70, abs=0.01)  # not measured: optimistic (acceptance 0.9), to be tried
    for _ in range(10):
        table.observe(4, 1)  # short windows of fresh guesses gain only their head...
        table.observe(32, 9)  # ...while long windows, refined over many forwards, gain nine tokens
    assert table.gain(4) == pytest.approx(1.0) and table.gain(32) == pytest.approx(9.0)
    assert table.gain(2) == pytest.approx(1.9)  # not measured: optimistic
    assert table.gain(8) == pytest.approx(5.70, abs=0.01) and table.gain(64) > 9.0
    for _ in range(10):
        table.observe(8, 6)
        table.observe(16, 4)  # noise: a longer window measured below a shorter one
    assert table.gain(16) == pytest.approx(6.0)  # a longer window holds the shorter: never worth less
    estimate = AcceptanceEstimate(table=table)
    for _ in range(5):
        estimate.observe(32, 5)  # this request gains half of the model's average beyond its head
    assert estimate.scale < 0.75 and 1.0 < estimate.expected(32) < table.gain(32)
    nearly_free = curve(lambda b, w: 10.0 + 0.01 * b * w)
    assert plan_drafts(nearly_free, [DraftRow(AcceptanceEstimate(table=table), 32)]).width == 32


def test_observed_costs_raise_the_cells_that_proved_dearer():
    from jf_ray.decoding.planner import ObservedCosts

    costs = ObservedCosts(curve(knee(64)))
    for _ in range(10):
        costs.observe(16, 4, 40.0)  # the curve says 10 ms; served, these forwards took 40
        costs.observe(16, 1, 5.0)  # faster than the curve: no correction downwards
    assert costs.cost_ms(16, 4) == pytest.approx(40.0) and costs.cost_ms(16, 1) == pytest.approx(10.0)
    assert costs.cost_ms(16, 2) == pytest.approx(10.0)  # not timed: between 1x and 4x, the smaller correction
    assert costs.cost_ms(8, 4) == pytest.approx(4 * costs.curve.cost_ms(8, 4))  # 16 rows' correction, borrowed
    assert costs.cost_ms(16, 16) == pytest.approx(4 * costs.curve.cost_ms(16, 16))  # the nearest timed width's
    # Sixteen rows that draft on the curve's word are held at AR once every wider forward proved 4x dearer.
    rows = good_rows(16)
    for row in rows:
        for length in (2, 4, 16, 32, 64):  # every length measured: nothing left to explore
            row.acceptance.table.observe(length, min(length, 4))
    assert plan_drafts(costs.curve, rows).width > 1
    for width in (2, 8, 16, 32, 64):
        for _ in range(10):
            costs.observe(16, width, 4 * costs.curve.cost_ms(16, width))
    assert plan_drafts(costs, rows).width == 1


def test_untimed_widths_borrow_the_correction_their_neighbours_measured():
    """On long contexts every forward costs more than the start-up curve said. Once AR forwards of a batch are
    timed 2.5x dearer, an untried width at that batch is priced 2.5x too, and the plan is the one the corrected
    curve gives, not the wider one of an untried width that looks cheap beside dear AR forwards."""
    from jf_ray.decoding.planner import ObservedCosts

    rows = good_rows(16)
    for row in rows:
        for _ in range(5):
            for length, gained in ((2, 1.8), (4, 3.0), (8, 4.0), (16, 4.0), (32, 4.0), (64, 4.0)):
                row.acceptance.table.observe(length, gained)
    overhead = fixed_overhead(10.0)  # favours fewer, wider steps
    start_up = curve(lambda b, w: 0.5 * b * w)
    costs = ObservedCosts(start_up)
    for _ in range(10):
        costs.observe(16, 1, 2.5 * start_up.cost_ms(16, 1))
    assert costs.cost_ms(16, 4) == pytest.approx(2.5 * start_up.cost_ms(16, 4))
    corrected = plan_drafts(curve(lambda b, w: 1.25 * b * w), rows, overhead=overhead).width
    only_ar_corrected = CostCurve(
        BATCHES, WIDTHS, [[m * (2.5 if w == 1 else 1) for w, m in zip(WIDTHS, r)] for r in start_up.ms]
    )
    assert plan_drafts(costs, rows, overhead=overhead).width == corrected
    assert plan_drafts(only_ar_corrected, rows, overhead=overhead).width > corrected


def test_unmeasured_lengths_are_tried_only_where_trying_is_cheap():
    """A fresh table values unmeasured lengths at acceptance 0.9 so they get tried, but only where the step
    costs at most twice AR's: past the knee an untried length is worth the best shorter measured one."""
    from jf_ray.decoding.gains import GainTable

    def fresh_rows(table):
        return [DraftRow(AcceptanceEstimate(table=table), 32) for _ in range(16)]

    assert plan_drafts(curve(knee(64)), fresh_rows(GainTable())).width > 1  # cheap: tried on their promise
    per_row = {1: 1.0, 2: 2.3, 4: 3.0, 8: 6.0, 16: 12.0, 32: 24.0, 64: 48.0}  # a 2-wide forward costs 2.3x AR's
    dear = curve(lambda b, w: b * per_row[w])
    assert plan_drafts(dear, fresh_rows(GainTable())).width == 1
    measured = GainTable()
    for _ in range(5):
        measured.observe(4, 3.5)  # a length that proved itself is drafted even where trying is dear
    assert plan_drafts(dear, fresh_rows(measured)).width == 4
    # A step that costs far more than its forward makes trying cheap again.
    assert plan_drafts(dear, fresh_rows(GainTable()), overhead=fixed_overhead(200.0)).width > 1


def test_a_length_measured_low_is_tried_again_once_its_windows_fade():
    """Lengths are judged only while drafted: one measured in a bad moment would never be drafted again. Every
    length's weight fades with every window judged, so after about a hundred windows of others it is valued on
    its promise again where trying is cheap (and as the best shorter length elsewhere)."""
    from jf_ray.decoding.gains import GainTable

    table = GainTable()
    for _ in range(10):
        table.observe(32, 1)  # an unlucky start
    for _ in range(30):
        table.observe(8, 4)
    assert table.measured(32) and table.gain(32) == pytest.approx(4.0)  # still measured: worth what 8 is
    for _ in range(100):
        table.observe(8, 4)
    assert not table.measured(32) and table.measured(8)
    assert table.gain(32, explore=True) > 9.0 and table.gain(32, explore=False) == pytest.approx(4.0)


def test_the_last_width_is_kept_unless_another_pays_clearly_more_except_ar():
    rows = good_rows(1, longest=16)  # windows of 8 gain 4
    for _ in range(5):
        for length, gained in ((2, 1.5), (4, 2.5), (16, 4.5), (32, 4.5)):
            rows[0].acceptance.table.observe(length, gained)
    gentle = curve(lambda b, w: 10.0 + 0.3 * b * w)
    assert plan_drafts(gentle, rows).menu_width == 8  # 4 tokens in 12.4 ms beat 4.5 in 14.8 by 6%
    assert plan_drafts(gentle, rows, keep=16).menu_width == 16  # within 15%: the window keeps its length
    assert plan_drafts(gentle, rows, keep=4).menu_width == 8  # 2.5 tokens in 11.2 ms: 8 pays 45% more
    proportional = curve(lambda b, w: 10.0 * b * w)
    assert plan_drafts(proportional, rows, keep=8).menu_width == 1  # AR is taken as soon as it pays more


def test_the_cheap_bound_skips_widths_but_never_changes_the_plan(monkeypatch):
    """At saturation the planner skips widths whose upper bound cannot beat AR; its plans are the exhaustive
    search's, on curves from free width to saturation and tables with noisy, non-monotone measurements."""
    import random

    from jf_ray.decoding import planner
    from jf_ray.decoding.gains import GainTable
    from jf_ray.decoding.planner import StepOverhead

    rng = random.Random(0)
    overhead = StepOverhead()
    for query in (16, 64, 256):
        overhead.observe(query, 8, 1.0 + 0.01 * query)
    skipped, looked_at, shape_of = 0, [], DraftRow.best_shape

    def counted_best_shape(row, width, explore=True):
        looked_at.append(width)
        return shape_of(row, width, explore)

    for _ in range(80):
        table = GainTable()
        for length in rng.sample([2, 4, 8, 16, 32], rng.randint(0, 5)):
            for _ in range(4):
                table.observe(length, rng.randint(1, length))
        rows = [DraftRow(AcceptanceEstimate(table=table), rng.choice([1, 3, 8, 32])) for _ in range(rng.randint(1, 16))]
        for row in rows:
            row.acceptance.gained = rng.uniform(0.1, 3.0)
        costs, fixed, keep = curve(knee(rng.choice([4, 16, 64, 256]))), rng.randint(0, 3), rng.choice([None, 4, 32])
        looked_at.clear()
        with monkeypatch.context() as patch:
            patch.setattr(DraftRow, "best_shape", counted_best_shape)
            pruned = plan_drafts(costs, rows, fixed, 1, overhead, keep)
        with monkeypatch.context() as patch:
            patch.setattr(planner, "_gain_ceiling", lambda rows: None)
            exhaustive = plan_drafts(costs, rows, fixed, 1, overhead, keep)
        assert pruned == exhaustive
        skipped += len(set(looked_at)) < len(planner.candidate_widths(max(row.widest for row in rows)))
    assert skipped >= 10  # the bound did skip widths, in many of the trials

"""The load-aware planner is a pure function of (cost curve, acceptance, batch): its choices, checked alone."""

from __future__ import annotations

import pytest

from jf_ray.decoding.planner import AcceptanceEstimate, CostCurve, DraftRow, DraftShape, plan_drafts

BATCHES, WIDTHS = [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64]


def curve(ms_of) -> CostCurve:
    return CostCurve(BATCHES, WIDTHS, [[ms_of(b, w) for w in WIDTHS] for b in BATCHES])


def knee(tokens: int) -> float:
    """A roofline-like curve: flat up to ``tokens`` query tokens per forward, then proportional to them."""
    return lambda b, w: 10.0 * max(1.0, b * w / tokens)


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
        hopeless.observe(16, 1)
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
    # Wider than the grid costs more: 32 tokens and 3 candidates (128 wide) lose to 16 and 3 (64 wide).
    assert plan_drafts(free, good_rows(1, longest=32, candidates=3)).shapes == [DraftShape(16, 3)]


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
    assert DraftRow(estimate, 8, 2).best_shape(3) == DraftShape(3)  # no room for a 2-token draft and a candidate
    for _ in range(30):
        estimate.observe_candidates(2, 0)  # candidates that never win
    assert estimate.recycled < 0.01
    assert plan_drafts(nearly_free, [DraftRow(estimate, 8, 2)]).shapes == [DraftShape(8)]
    assert estimate.expected(4, 100) <= 4  # never more than the draft's length


def test_acceptance_estimate_learns():
    estimate = AcceptanceEstimate()
    for _ in range(30):
        estimate.observe(16, 16)
    assert estimate.p > 0.95 and estimate.expected(16) > 14
    for _ in range(30):
        estimate.observe(16, 1)
    assert estimate.p < 0.05 and estimate.expected(16) < 1.1


def test_cost_curve_interpolates_and_round_trips():
    c = curve(lambda b, w: float(b * w))
    assert c.cost_ms(3, 3) == pytest.approx(9.0, rel=0.2)
    assert c.cost_ms(32, 64) == pytest.approx(2048.0)  # beyond the grid: proportional
    assert CostCurve.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="increasing"):
        CostCurve([2, 1], [1], [[1.0], [1.0]])


def test_step_overhead_fit_splits_fixed_and_per_token_time():
    from jf_ray.decoding.planner import StepOverhead

    fit = StepOverhead()
    for tokens in [1, 4, 9, 2, 16, 7] * 10:
        fit.observe(tokens, 5.0 + 0.5 * tokens)
    assert fit.fixed_ms == pytest.approx(5.0, abs=1e-6) and fit.per_token_ms == pytest.approx(0.5, abs=1e-6)
    assert fit.step_ms(10) == pytest.approx(10.0)
    constant = StepOverhead()
    for _ in range(10):
        constant.observe(8, 12.0)  # no variation in tokens: all of it counts as fixed
    assert constant.per_token_ms == 0.0 and constant.fixed_ms == pytest.approx(12.0)


def test_per_token_overhead_rewards_width_less_than_the_same_fixed_overhead():
    from jf_ray.decoding.planner import StepOverhead

    fixed, per_token = StepOverhead(), StepOverhead()
    for tokens in (1, 2, 3, 4) * 10:
        fixed.observe(tokens, 40.0)
        per_token.observe(tokens, 10.0 * tokens)  # detokenizing and streaming: each token costs 10 ms
    proportional = curve(lambda b, w: 2.0 * b * w)
    assert plan_drafts(proportional, good_rows(4), overhead=fixed).width > 1  # fewer, wider steps pay less of it
    assert plan_drafts(proportional, good_rows(4), overhead=per_token).width == 1


def test_length_calibration_values_long_windows_by_what_they_gained():
    from jf_ray.decoding.planner import LengthCalibration

    calibration = LengthCalibration()
    estimate = AcceptanceEstimate(calibration=calibration)
    for _ in range(40):
        estimate.observe(8, 4)
    plain = AcceptanceEstimate(matched=estimate.matched, examined=estimate.examined)
    assert estimate.expected(8) == pytest.approx(4.0, rel=0.15)  # what windows of 8 gained
    # Jacobi's long runs: windows of 32 gained 12, far beyond the geometric model's ~2.5 at the same p.
    for _ in range(40):
        estimate.observe(32, 12)
    long_run = AcceptanceEstimate(matched=estimate.matched, examined=estimate.examined, calibration=calibration)
    assert long_run.expected(32) > 2 * plain.expected(32)
    assert long_run.expected(16) == pytest.approx(long_run.expected(32), rel=0.5)  # 16 borrows 32's ratio
    assert long_run.expected(32, candidates=3) <= 32
    gentle = curve(lambda b, w: 10.0 + 0.1 * b * w)
    uncalibrated = plan_drafts(gentle, [DraftRow(plain, 32)])
    calibrated = plan_drafts(gentle, [DraftRow(long_run, 32)])
    assert calibrated.width == 32 and calibrated.width > uncalibrated.width

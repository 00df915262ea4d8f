"""The load-aware planner is a pure function of (cost curve, acceptance, batch): its choices, checked alone."""

from __future__ import annotations

import pytest

from jf_ray.decoding.planner import AcceptanceEstimate, CostCurve, plan_drafts

BATCHES, WIDTHS = [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64]


def curve(ms_of) -> CostCurve:
    return CostCurve(BATCHES, WIDTHS, [[ms_of(b, w) for w in WIDTHS] for b in BATCHES])


def knee(tokens: int) -> float:
    """A roofline-like curve: flat up to ``tokens`` query tokens per forward, then proportional to them."""
    return lambda b, w: 10.0 * max(1.0, b * w / tokens)


def good_rows(count: int, longest: int = 64) -> list[tuple[AcceptanceEstimate, int]]:
    rows = []
    for _ in range(count):
        estimate = AcceptanceEstimate()
        for _ in range(20):  # a request that accepts 4 tokens of every 8-token draft
            estimate.observe(8, 4)
        rows.append((estimate, longest))
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
    assert plan_drafts(curve(lambda b, w: 10.0 + 0.01 * b * w), [(hopeless, 64)]).width == 1


def test_caps_and_fixed_rows():
    plan = plan_drafts(curve(knee(64)), good_rows(2, longest=5))
    assert plan.lengths == [5, 5]
    # Another request already makes the forward 32 wide: the auto row may use that width for free.
    shared = plan_drafts(curve(knee(16)), good_rows(1), fixed_rows=1, fixed_width=32)
    assert shared.width >= 32


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

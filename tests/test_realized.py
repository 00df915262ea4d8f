"""The planner's guard: drafting is judged by the tokens per second whole steps earned, against AR's."""

from __future__ import annotations

from jf_ray.decoding.realized import FIRST_HOLD, MIN_STEPS, REPROBE_STEPS, SETTLING_STEPS, RealizedRates

ENOUGH = SETTLING_STEPS + MIN_STEPS


def run(rates, rows: int, steps: int, ms_drafting: float, ms_ar: float, tokens=(2, 1)):
    """Steps of a batch that drafts whenever the guard allows it; what the guard allowed at each."""
    allowed = []
    for _ in range(steps):
        drafting = rates.allows_drafting(rows)
        allowed.append(drafting)
        per_row, ms = (tokens[0], ms_drafting) if drafting else (tokens[1], ms_ar)
        rates.observe(rows, drafting, per_row * rows, ms / 1000.0)
    return allowed


def test_drafting_that_earns_less_than_ar_is_held_at_ar_for_ever_longer():
    rates = RealizedRates()
    allowed = run(rates, 64, 8000, ms_drafting=30.0, ms_ar=10.0)
    assert all(allowed[:ENOUGH])  # drafting is measured first
    assert not any(allowed[ENOUGH : 2 * ENOUGH + FIRST_HOLD])  # then AR beside it (2 tokens in 30 ms < 1 in
    # 10), then held at AR
    retries = [i for i in range(1, len(allowed)) if allowed[i] and not allowed[i - 1]]
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert len(retries) >= 4 and gaps == sorted(gaps) and gaps[0] < gaps[-1]  # retried after ever longer holds
    assert sum(allowed) < 0.05 * len(allowed)  # drafting ran a small share of the steps


def test_drafting_that_pays_is_only_probed_now_and_then():
    rates = RealizedRates()
    allowed = run(rates, 16, 3 * REPROBE_STEPS, ms_drafting=20.0, ms_ar=12.0)  # 2 tokens in 20 ms vs 1 in 12
    assert not any(allowed[ENOUGH : 2 * ENOUGH]) and all(allowed[2 * ENOUGH : REPROBE_STEPS])  # one probe, then on
    assert allowed.count(False) <= 4 * ENOUGH  # AR measured again every thousand drafting steps, never held
    assert rates.sizes[16].held == 0


def test_batch_sizes_are_judged_apart():
    rates = RealizedRates()
    run(rates, 64, 3 * ENOUGH, ms_drafting=30.0, ms_ar=10.0)
    assert not rates.allows_drafting(64) and not rates.allows_drafting(100)  # 100 rows count as 64
    assert rates.allows_drafting(40) and rates.allows_drafting(2)  # other sizes: nothing measured there

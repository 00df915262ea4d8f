"""Noise ratio and schedules (docs/method-notes.md §3; §10 items 2-3)."""

from __future__ import annotations

import random

import pytest

from jf_ray.packing.schedules import (
    choose_state,
    first_divergence,
    noise_ratio,
    ratio_grid,
    target_ratios,
)

FIXED = [11, 12, 13, 14]
# The worked example of docs/method-notes.md §3, with the true random draft as state 0 (our data) instead of the alias.
STATES = [[11, 90, 91, 92], [11, 12, 93, 94], [11, 12, 13, 95], FIXED]


def test_noise_ratio_counts_everything_after_the_first_divergence():
    assert first_divergence([11, 90, 13, 14], FIXED) == 1
    assert noise_ratio([11, 90, 13, 14], FIXED) == 0.75  # 13, 14 are right but follow a wrong token
    assert noise_ratio(FIXED, FIXED) == 0.0
    assert noise_ratio([0, 12, 13, 14], FIXED) == 1.0
    assert [noise_ratio(s, FIXED) for s in STATES] == [0.75, 0.5, 0.25, 0.0]


def test_noise_ratio_rejects_length_mismatch():
    with pytest.raises(ValueError, match="4"):
        noise_ratio([1, 2, 3], FIXED)


def test_grid_is_linspace_with_endpoint():
    assert ratio_grid(4) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert ratio_grid(1) == [0.0]
    with pytest.raises(ValueError):
        ratio_grid(0)


def test_progressive_schedule_is_a_cyclic_ramp_and_reverse_mirrors_it():
    grid = ratio_grid(4)
    assert target_ratios(9, 4, "progressive") == [grid[j % 4] for j in range(9)]
    assert target_ratios(9, 4, "reverse") == [grid[3 - j % 4] for j in range(9)]
    assert target_ratios(9, 4, "progressive")[4] == 0.0  # restarts clean at every window


def test_random_schedule_draws_from_the_grid_reproducibly():
    first = target_ratios(50, 4, "random", random.Random(7))
    assert first == target_ratios(50, 4, "random", random.Random(7))
    assert set(first) <= set(ratio_grid(4))
    assert len(set(first)) > 1
    with pytest.raises(ValueError, match="unknown strategy"):
        target_ratios(3, 4, "sideways")  # type: ignore[arg-type]


def test_choose_state_picks_the_nearest_ratio():
    # Worked example of docs/method-notes.md §3: targets 0, 1/3, 2/3, 1.
    chosen = [choose_state(STATES, FIXED, t) for t in ratio_grid(4)]
    assert chosen == [3, 2, 0, 0]
    for target, index in zip(ratio_grid(4), chosen):
        best = min(abs(noise_ratio(s, FIXED) - target) for s in STATES)
        assert abs(noise_ratio(STATES[index], FIXED) - target) == best


def test_target_zero_picks_the_fixed_point_even_when_an_earlier_state_equals_it():
    states = [[11, 0, 0, 0], FIXED, FIXED]
    assert choose_state(states, FIXED, 0.0) == 2
    assert choose_state([FIXED], FIXED, 1.0) == 0  # a block decoded in one forward has only the fixed point

"""Progressive noise schedules: which recorded Jacobi state of each block becomes its noisy copy.

Method: docs/method-notes.md §3. The noise ratio of a state counts everything from its *first* divergence
from the fixed point as noisy (tokens after it count even if they happen to be right). Each block gets a
target ratio from a schedule over a window of ``W`` consecutive blocks, and the recorded state whose ratio is
nearest the target becomes the noisy block.

Grid: ``linspace(0, 1, W)`` (the official code's grid, endpoint 1 included) rather than the paper's
``{0, 1/W, ..., (W-1)/W}``. Our trajectories keep the true random initial draft as state 0, so ratio 1.0 (or
``(n-1)/n``: the head token is always right) is reachable, unlike the official data where state 0 aliases the
fixed point.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

Strategy = Literal["progressive", "random", "reverse"]
STRATEGIES: tuple[str, ...] = ("progressive", "random", "reverse")


def first_divergence(state: Sequence[int], fixed_point: Sequence[int]) -> int:
    """Index of the first token where ``state`` differs from ``fixed_point`` (``len`` if none)."""
    if len(state) != len(fixed_point):
        raise ValueError(f"state has {len(state)} tokens but the fixed point has {len(fixed_point)}")
    for index, (token, target) in enumerate(zip(state, fixed_point)):
        if token != target:
            return index
    return len(fixed_point)


def noise_ratio(state: Sequence[int], fixed_point: Sequence[int]) -> float:
    """Share of the block from the first divergence on: 0 for the fixed point, up to 1."""
    if not fixed_point:
        return 0.0
    return (len(fixed_point) - first_divergence(state, fixed_point)) / len(fixed_point)


def ratio_grid(window: int) -> list[float]:
    """``linspace(0, 1, window)``; a window of 1 is the single ratio 0 (every noisy block is clean)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        return [0.0]
    return [step / (window - 1) for step in range(window)]


def target_ratios(
    num_blocks: int,
    window: int,
    strategy: Strategy = "progressive",
    rng: random.Random | None = None,
    phase: int = 0,
) -> list[float]:
    """Target noise ratio of each of ``num_blocks`` consecutive blocks.

    progressive: cyclic linear ramp 0 -> 1 restarting every ``window`` blocks (the method's default);
    reverse: the same ramp 1 -> 0 (ablation); random: uniform draws from the same grid (ablation; pass a
    seeded ``rng`` for reproducible packing). ``phase`` starts the ramps that many steps in: a response of
    fewer blocks than the window reaches only the ramp's low end from step 0 (docs/training.md).
    """
    grid = ratio_grid(window)
    if strategy == "progressive":
        return [grid[(j + phase) % window] for j in range(num_blocks)]
    if strategy == "reverse":
        return [grid[window - 1 - ((j + phase) % window)] for j in range(num_blocks)]
    if strategy == "random":
        rng = rng or random.Random(0)
        return [grid[rng.randrange(window)] for _ in range(num_blocks)]
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def choose_state(states: Sequence[Sequence[int]], fixed_point: Sequence[int], target: float) -> int:
    """Index of the state whose noise ratio is nearest ``target``.

    Ties go to the latest state: states are recorded from the random draft to the fixed point, so target 0
    picks the fixed point itself (the last state) even when an earlier state happens to equal it.
    """
    if not states:
        raise ValueError("a block needs at least one recorded state")
    distances = [abs(noise_ratio(state, fixed_point) - target) for state in states]
    best = min(distances)
    return max(index for index, distance in enumerate(distances) if distance == best)

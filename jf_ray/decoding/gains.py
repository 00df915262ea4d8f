"""What a draft is expected to gain: the engine-wide gain table of window lengths and each request's acceptance
estimate, the load-aware planner's view of acceptance (docs/load-aware-decoding.md). Pure and torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

EXPLORING_ACCEPTANCE = 0.9  # acceptance assumed of a window length not measured yet: optimistic, so it is tried
PRIOR_RECYCLED = 0.5  # tokens one recycled candidate is assumed to add beyond the main draft, with no history
DECAY = 0.8  # weight of the past in a request's exponential averages: about its last five forwards count
GAIN_DECAY = 0.98  # the engine-wide gain table: about the last fifty windows judged
MIN_GAIN_WEIGHT = 3.0  # a length counts as measured once about three windows of it were judged
MAX_SCALE = 4.0  # a request's ease scales the table's gain beyond the head by at most this (or 1/this)


@cache
def harmonic(count: int) -> float:
    """1 + 1/2 + ... + 1/count: the k-th candidate is expected to add 1/k of what the first adds."""
    return sum(1.0 / k for k in range(1, count + 1))


def menu_length(length: int) -> int:
    """The window length ``length`` is counted under: the largest power of two not above it."""
    return 1 << (max(1, length).bit_length() - 1)


def geometric_gain(p: float, length: int) -> float:
    """``1 + p + ... + p^(length-1)``: the tokens a window gains when each drafted token is accepted with ``p``."""
    return float(length) if p >= 1.0 else (1.0 - p**length) / (1.0 - p)


@dataclass
class GainTable:
    """Tokens a rolling window of each length gains per forward, measured over every ``auto`` request of one
    engine (one model). Jacobi's gain depends on the window's length far beyond what one acceptance rate
    says: a token entering a long window is refined over many forwards before it reaches the head, so a
    window of 32 may gain three tokens per forward where a window of 4, on the same model, gains barely more
    than its head (docs/load-aware-decoding.md). No model of the curve is assumed; each length is measured.

    Per menu length (:func:`menu_length`), an exponentially weighted mean of the tokens gained by settled
    windows. A measured length is worth at least every shorter measured one (a longer window holds the
    shorter). A length not measured yet is valued optimistically (the gain at acceptance 0.9) where trying it is
    cheap (``explore``), so that it is tried and measured; elsewhere it is worth the best shorter measured one.
    """

    mean: dict[int, float] = field(default_factory=dict)
    weight: dict[int, float] = field(default_factory=dict)
    _gains: dict[tuple[bool, int], float] = field(default_factory=dict, repr=False)  # (explore, menu length) -> gain
    _by_length: dict[tuple[bool, int], float] = field(default_factory=dict, repr=False)  # (explore, any length)

    def observe(self, length: int, accepted: int) -> None:
        # Every length's weight fades with every window judged, drafted or not: a length measured low in a bad
        # moment is no longer "measured" after about a hundred windows of others, and is tried again where cheap.
        self.weight = {other: GAIN_DECAY * weight for other, weight in self.weight.items()}
        key = menu_length(length)
        weight = self.weight.get(key, 0.0) + 1.0
        mean = self.mean.get(key, float(accepted))
        self.weight[key], self.mean[key] = weight, mean + (accepted - mean) / weight
        self._gains.clear()
        self._by_length.clear()

    def measured(self, length: int) -> bool:
        return self.weight.get(menu_length(length), 0.0) >= MIN_GAIN_WEIGHT

    def gain(self, length: int, explore: bool = True) -> float:
        """Expected tokens per forward of a window of ``length`` tokens (head included); linear in between
        menu lengths (a window cut to a request's last few tokens). Unmeasured lengths: see the class."""
        if (explore, length) in self._by_length:
            return self._by_length[explore, length]
        key = menu_length(length)
        if (explore, 2 * key) not in self._gains:
            self._fill(2 * key, explore)
        low, high = self._gains[explore, key], self._gains[explore, 2 * key]
        self._by_length[explore, length] = min(float(length), low + (high - low) * (length - key) / key)
        return self._by_length[explore, length]

    def _fill(self, longest: int, explore: bool) -> None:
        """Gains of the menu lengths up to ``longest``: measured (non-decreasing), else optimistic or the best."""
        best, key = 1.0, 1
        while key <= longest:
            if self.measured(key):
                best = max(best, self.mean[key])
            optimistic = geometric_gain(EXPLORING_ACCEPTANCE, key) if explore and not self.measured(key) else 1.0
            self._gains[explore, key] = max(best, optimistic)
            key *= 2


@dataclass
class AcceptanceEstimate:
    """One request's acceptance, for both shape families: the window and its recycled candidates.

    The window: a window of ``L`` tokens is expected to gain ``1 + (g(L) - 1) * scale`` tokens, ``g`` from the
    engine's :class:`GainTable` (shared by its ``auto`` requests; a private one otherwise) and ``scale`` this
    request's exponentially weighted ratio of what its windows gained beyond the head to what the table
    expected of them (an easy prompt converges faster than the model's average).

    ``recycled`` is the exponential average of the tokens the best of a forward's candidates gained beyond the
    main draft, per unit of ``harmonic(candidates)``: ``c`` candidates are expected to add
    ``recycled * harmonic(c)``. It learns only from forwards that verified candidates.
    """

    table: GainTable = field(default_factory=GainTable)
    gained: float = 1.0  # exponential averages of the extra tokens gained, and of those the table expected
    expected_extra: float = 1.0
    recycled: float = PRIOR_RECYCLED

    @property
    def scale(self) -> float:
        return min(max(self.gained / self.expected_extra, 1 / MAX_SCALE), MAX_SCALE)

    def expected(self, length: int, candidates: int = 0, explore: bool = True) -> float:
        """Expected tokens gained by a forward with this shape; never more than ``length`` (the winner's)."""
        window = 1.0 + (self.table.gain(length, explore) - 1.0) * self.scale
        return min(float(length), window + self.recycled * harmonic(candidates))

    def observe(self, length: int, accepted: int) -> None:
        """One forward with a window of ``length`` tokens (head included) that gained ``accepted`` tokens."""
        if length > 1:
            self.gained = DECAY * self.gained + (1 - DECAY) * (accepted - 1)
            self.expected_extra = DECAY * self.expected_extra + (1 - DECAY) * max(self.table.gain(length) - 1, 1e-3)
        self.table.observe(length, accepted)

    def observe_candidates(self, candidates: int, extra: int) -> None:
        """One forward whose ``candidates`` verified candidates gained ``extra`` tokens beyond the main draft."""
        self.recycled = DECAY * self.recycled + (1 - DECAY) * extra / harmonic(candidates)

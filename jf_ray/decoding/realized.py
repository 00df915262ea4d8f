"""The guard behind the load-aware planner: what drafting actually earned against AR (docs/load-aware-decoding.md).

The planner predicts a step's time from a cost curve and a fitted overhead; in a server part of that overhead
(detokenizing and streaming, done by other threads that take the interpreter lock from the engine's) lands on
later steps and grows with the tokens committed, which a per-step fit cannot see. The guard measures instead:
per batch size (rounded down to a power of two), the tokens per second of the whole steps the batch got while
it drafted and while it was AR. Once drafting has been measured, AR is measured beside it (and again now and
then); where drafting earned less than AR, the batch is held at AR for a while, then drafting may be tried
again, and each time it loses again the hold doubles. Pure and torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jf_ray.decoding.gains import menu_length

logger = logging.getLogger(__name__)

RATE_DECAY = 0.97  # weight of the past in each regime's rate: about the last thirty steps count
MIN_STEPS = 24  # steps a regime needs before its rate is trusted (a fresh window gains little at first)
MIN_WEIGHT = (1 - RATE_DECAY**MIN_STEPS) / (1 - RATE_DECAY)  # the weight of that many steps
SETTLING_STEPS = 2  # steps after a change of regime that are not counted (the last regime's work spills over)
FIRST_HOLD = 50  # steps a batch size is held at AR once drafting earned less than AR there...
LONGEST_HOLD = 1600  # ...doubling each time drafting loses again right after a hold, up to this
REPROBE_STEPS = 1000  # drafting steps after which AR is measured again (the machine and the load change)


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    weight: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self.tokens = RATE_DECAY * self.tokens + tokens
        self.seconds = RATE_DECAY * self.seconds + seconds
        self.weight = RATE_DECAY * self.weight + 1.0

    @property
    def trusted(self) -> bool:
        return self.weight >= MIN_WEIGHT - 1e-9

    @property
    def per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _BatchSize:
    ar: _Rate = field(default_factory=_Rate)
    drafting: _Rate = field(default_factory=_Rate)
    last_regime: bool | None = None  # whether the last step drafted
    since_change: int = 0
    drafted_since_probe: int = 0
    held: int = 0  # steps left at AR
    next_hold: int = FIRST_HOLD


@dataclass
class RealizedRates:
    """Tokens per second of whole decoding steps, drafting against AR, by batch size; bars drafting where it
    earned less. ``observe`` takes every step of an engine's load-aware plans, ``allows_drafting`` is asked
    before each plan."""

    sizes: dict[int, _BatchSize] = field(default_factory=dict)

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One step of ``rows`` rows that drafted or not and committed ``tokens`` in ``seconds``."""
        size = self.sizes.setdefault(menu_length(rows), _BatchSize())
        if drafted != size.last_regime:
            size.last_regime, size.since_change = drafted, 0
        size.since_change += 1
        size.drafted_since_probe += drafted
        if size.since_change > SETTLING_STEPS:
            (size.drafting if drafted else size.ar).observe(tokens, seconds)

    def allows_drafting(self, rows: int) -> bool:
        """False while this batch size is held at AR, and while AR is measured beside a trusted drafting rate."""
        size = self.sizes.setdefault(menu_length(rows), _BatchSize())
        if size.held:
            size.held -= 1
            return False
        if not size.drafting.trusted:
            return True
        if size.drafted_since_probe >= REPROBE_STEPS:
            size.ar, size.drafted_since_probe = _Rate(), 0
        if not size.ar.trusted:
            return False  # a probe: AR's rate at this batch size is what drafting is judged against
        if size.drafting.per_s < size.ar.per_s:
            logger.info(
                "auto at %d rows: drafting earned %.0f tokens/s, AR %.0f: AR for %d steps",
                rows,
                size.drafting.per_s,
                size.ar.per_s,
                size.next_hold,
            )
            size.held, size.drafting = size.next_hold, _Rate()  # drafting is judged afresh after the hold
            size.next_hold = min(2 * size.next_hold, LONGEST_HOLD)
            return False
        size.next_hold = FIRST_HOLD
        return True

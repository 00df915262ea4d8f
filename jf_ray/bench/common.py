"""What every benchmark shares: the machine record of its JSON report and the one meaning of a speed-up.

See docs/benchmarking.md. Light imports only: the serving benchmark uses this without loading torch.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import NamedTuple


class MachineRecord:
    """The machine a benchmark ran on and how busy it was: every report's ``machine`` field.

    Other processes on a shared machine skew every timing, so the load average is taken when the benchmark
    starts (:meth:`start`) and when it ends (:meth:`finish`)."""

    def __init__(self, load_avg_start: tuple[float, float, float], started: float):
        self.load_avg_start, self.started = load_avg_start, started

    @classmethod
    def start(cls) -> MachineRecord:
        return cls(os.getloadavg(), time.perf_counter())

    def finish(self, precision: str | None = None) -> dict:
        """{cpus, platform, python, torch, load_avg_start, load_avg_end (1, 5, 15 min), wall_s}, the processor
        (model, SIMD features, threads, native bf16), transformers' version, and the ``precision`` computed in."""
        from jf_ray.precision import machine_record

        return {
            **machine_record(),
            "precision": precision,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),  # without importing it (the serving benchmark)
            "load_avg_start": [round(x, 2) for x in self.load_avg_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - self.started, 1),
        }


class SpeedUp(NamedTuple):
    median: float
    low: float
    high: float


def speedup(tokens_per_s: Sequence[float], reference_tokens_per_s: Sequence[float]) -> SpeedUp | None:
    """The one speed-up of every benchmark: tokens/s over the reference's tokens/s on the same requests.

    The two sequences are interleaved repeats, the i-th of each timed next to the other (adjacent runs share
    the machine's state, which on a shared machine drifts by tens of percent within a minute); the speed-up is
    the median of the paired ratios, with their lowest and highest. One repeat gives the plain ratio. Pairs
    whose reference made no progress are left out; None when none is left."""
    ratios = [
        rate / ref
        for rate, ref in zip(tokens_per_s, reference_tokens_per_s, strict=True)
        if ref > 0 and math.isfinite(rate) and math.isfinite(ref)
    ]
    if not ratios:
        return None
    return SpeedUp(round(statistics.median(ratios), 4), round(min(ratios), 4), round(max(ratios), 4))

"""Typed config of the packing stage (``jf-ray pack`` and :func:`jf_ray.packing.pack`)."""

from __future__ import annotations

from pydantic import Field

from jf_ray.config import Location, StageConfig
from jf_ray.packing.schedules import Strategy


class PackConfig(StageConfig):
    """Trajectories (schema jf_ray.trajectories) -> packed training sequences (schema jf_ray.packed)."""

    trajectories: Location = Field(..., description="URI of the trajectory dataset written by `jf-ray collect`")
    out: Location = Field(..., description="URI of the packed dataset to write")
    window: int = Field(16, ge=1, description="noise-schedule window W in blocks (ratios linspace(0, 1, W))")
    strategy: Strategy = Field(
        "progressive",
        description="target ratio per block: cyclic ramp (method), random or reverse (ablations)",
    )
    seed: int = Field(0, description="seed of the random strategy (each response draws from (seed, prompt_id))")
    random_phase: bool = Field(
        True,
        description="start each response's ramp at a random step (from seed, prompt_id), so that responses "
        "shorter than the window see every noise ratio, not only the ramp's low end (docs/training.md)",
    )
    max_tokens: int | None = Field(
        None, ge=2, description="cap on packed length: keep the leading blocks that fit (None = no cap)"
    )
    rows_per_shard: int = Field(1024, ge=1, description="packed sequences per output Parquet shard")

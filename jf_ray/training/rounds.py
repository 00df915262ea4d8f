"""Progressive distillation rounds (jacobi_forcing.md section 6.1): round = collect -> pack -> train.

Round 1 collects the base model's trajectories at block size 16 and trains the base model; round k+1
collects with round k's checkpoint at the next (larger) block size, 32 by default, and continues training
from that checkpoint (fresh optimizer and schedule). Everything of round k lives under
``<out>/round-<k>/`` (``trajectories``, ``packed``, ``train``); a finished round (its training summary
exists) is skipped on a re-run, and each stage resumes on its own, so the whole sequence is resumable.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from jf_ray.config import StageConfig

logger = logging.getLogger(__name__)


class RoundsConfig(StageConfig):
    """Several Jacobi Forcing rounds; per-stage settings pass through to the stage configs."""

    model: str = Field(..., description="base model of round 1: HF dir, file:// or s3:// URI, hub name")
    prompts: str = Field(..., description="JSONL URI of training prompts (collection input of every round)")
    out: str = Field(..., description="root URI; round k writes under <out>/round-<k>/")
    block_sizes: list[int] = Field([16, 32], min_length=1, description="block size n of each round")
    window: int = Field(16, ge=1, description="noise-schedule window of every round")
    strategy: Literal["progressive", "random", "reverse"] = Field("progressive", description="noise schedule")
    max_new_tokens: int = Field(256, ge=1, description="collection cap on new tokens per prompt")
    collect: dict[str, Any] = Field(default_factory=dict, description="extra CollectConfig fields (workers, ...)")
    pack: dict[str, Any] = Field(default_factory=dict, description="extra PackConfig fields (max_tokens, ...)")
    train: dict[str, Any] = Field(default_factory=dict, description="extra TrainConfig fields (lr, steps, ...)")


def round_configs(config: RoundsConfig, index: int, model: str):
    """The (CollectConfig, PackConfig, TrainConfig) of round ``index`` (1-based) starting from ``model``."""
    from jf_ray.packing.config import PackConfig
    from jf_ray.storage import join_uri
    from jf_ray.trajectories.config import CollectConfig
    from jf_ray.training.config import TrainConfig

    root = join_uri(config.out, f"round-{index}")
    trajectories, packed = join_uri(root, "trajectories"), join_uri(root, "packed")
    collect = CollectConfig.from_dict({
        **config.collect, "model": model, "prompts": config.prompts, "out": trajectories, "round": index,
        "block_size": config.block_sizes[index - 1], "max_new_tokens": config.max_new_tokens,
    })  # fmt: skip
    pack = PackConfig.from_dict(
        {**config.pack, "trajectories": trajectories, "out": packed, "window": config.window,
         "strategy": config.strategy}  # fmt: skip
    )
    train = TrainConfig.from_dict({**config.train, "model": model, "data": packed, "out": join_uri(root, "train")})
    return collect, pack, train


def finished_round(train_config) -> dict | None:
    """The training summary of a round that already finished, or None."""
    from jf_ray.storage import exists, join_uri, read_json

    from jf_ray.training.ray_train import SUMMARY_FILE

    uri = join_uri(train_config.out, train_config.run_name, SUMMARY_FILE)
    return read_json(uri) if exists(uri) else None


def run_rounds(config: RoundsConfig) -> dict:
    """Run every round in order; returns the per-round summaries and the final checkpoint."""
    from jf_ray.packing.ray_pack import pack
    from jf_ray.trajectories.collect import collect
    from jf_ray.training.ray_train import train

    model, rounds = config.model, []
    for index in range(1, len(config.block_sizes) + 1):
        collect_config, pack_config, train_config = round_configs(config, index, model)
        done = finished_round(train_config)
        if done is not None:
            logger.info("round %d already trained: %s", index, done["checkpoint"])
            rounds.append({"round": index, "train": done, "skipped": True})
        else:
            logger.info("round %d: n=%d from %s", index, collect_config.block_size, model)
            collected = collect(collect_config)
            packed = pack(pack_config)
            trained = train(train_config)
            rounds.append({"round": index, "collect": collected, "pack": packed, "train": trained})
        model = rounds[-1]["train"]["checkpoint"]
    return {"rounds": rounds, "checkpoint": model}

"""One collection worker (no Ray): turns a shard of prompts into one written, checksummed Parquet shard.

The Ray actor in :mod:`jf_ray.trajectories.ray_pool` is a thin wrapper that owns one of these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from jf_ray.prompts import Prompt
from jf_ray.storage import DatasetWriter, retry_count
from jf_ray.trajectories.backends import BackendSpec, GenerationBackend, make_backend
from jf_ray.trajectories.recorder import record_trajectories
from jf_ray.trajectories.schema import TRAJECTORY_SCHEMA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    name: str
    prompts: tuple[Prompt, ...]
    seed: int


@dataclass(frozen=True)
class RecordSettings:
    """What every shard of one run shares (sent once to each worker)."""

    out: str
    block_size: int
    max_new_tokens: int
    batch_size: int
    model_id: str
    round_index: int


class ShardWorker:
    def __init__(
        self,
        settings: RecordSettings,
        spec: BackendSpec | None = None,
        backend: GenerationBackend | None = None,
    ):
        if backend is None and spec is None:
            raise ValueError("ShardWorker needs a backend or a BackendSpec")
        self.settings = settings
        self.backend = backend if backend is not None else make_backend(spec)
        self.writer = DatasetWriter(settings.out, TRAJECTORY_SCHEMA)

    def run(self, task: ShardTask) -> dict:
        """Record and write one shard; returns its throughput report (tokens, seconds, forwards)."""
        start, retries_before = time.perf_counter(), retry_count()
        s = self.settings
        batch = record_trajectories(
            self.backend,
            list(task.prompts),
            block_size=s.block_size,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            seed=task.seed,
            model_id=s.model_id,
            round_index=s.round_index,
        )
        record = self.writer.write_shard(task.name, batch.table)
        shard_s = time.perf_counter() - start
        report = {
            "shard": task.name,
            "prompts": len(task.prompts),
            "rows": record["rows"],
            "tokens": batch.stats.tokens,
            "forwards": batch.stats.forwards,
            "generate_s": round(batch.generate_s, 4),
            "shard_s": round(shard_s, 4),
            "storage_retries": retry_count() - retries_before,
        }
        logger.info(
            "shard %s: %d prompts, %d tokens in %.1fs (%.1f tok/s, TPF %.2f)",
            task.name,
            len(task.prompts),
            batch.stats.tokens,
            shard_s,
            batch.stats.tokens / shard_s if shard_s else 0.0,
            batch.stats.tpf,
        )
        return report

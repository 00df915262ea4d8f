"""Library facade of trajectory collection: ``collect(CollectConfig) -> summary dict``.

Plans shards from the prompts, skips shards already finished in the output (their checksums verified),
runs the rest on a Ray actor pool, commits the manifest last, then re-reads the committed dataset to check
that every prompt appears exactly once with blocks 0..k-1.

Example::

    from jf_ray.trajectories import CollectConfig, collect
    summary = collect(CollectConfig(model="file:///ckpt", prompts="file:///p.jsonl", out="s3://b/traj", workers=4))
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from jf_ray.errors import UserInputError
from jf_ray.prompts import Prompt, read_prompts, shard_prompts
from jf_ray.storage import (
    DatasetError,
    DatasetWriter,
    exists,
    join_uri,
    read_dataset,
    read_json,
    retry_count,
    write_json_atomic,
)
from jf_ray.trajectories.config import CollectConfig
from jf_ray.trajectories.schema import TRAJECTORY_SCHEMA
from jf_ray.trajectories.worker import RecordSettings, ShardTask

logger = logging.getLogger(__name__)

RUN_FILE = "collect_run.json"
# Settings that change what a shard contains; a resumed run must match the finished shards on all of them.
_RUN_KEYS = (
    "model",
    "resolved_model_id",
    "round",
    "block_size",
    "max_new_tokens",
    "shard_size",
    "seed",
    "backend",
    "use_chat_template",
)


def plan_tasks(prompts: list[Prompt], config: CollectConfig) -> list[ShardTask]:
    return [
        ShardTask(name=name, prompts=tuple(chunk), seed=config.seed + index)
        for index, (name, chunk) in enumerate(shard_prompts(prompts, config.shard_size))
    ]


def run_identity(prompts: list[Prompt], config: CollectConfig) -> dict:
    digest = hashlib.sha256("\n".join(f"{p.id}\t{p.text}" for p in prompts).encode()).hexdigest()
    return {
        **{k: getattr(config, k) for k in _RUN_KEYS},
        "prompts_sha256": digest,
        "num_prompts": len(prompts),
    }


def check_resumable(config: CollectConfig, identity: dict) -> None:
    """Record this run's identity in ``out``; on resume, refuse an output made with other settings."""
    run_uri = join_uri(config.out, RUN_FILE)
    if config.resume and exists(run_uri):
        previous = read_json(run_uri)
        diffs = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in identity.items() if previous.get(k) != v]
        if diffs:
            raise UserInputError(
                f"{config.out} holds a collection with other settings ({'; '.join(diffs)}); "
                "use another output or resume=false to overwrite"
            )
        return
    write_json_atomic(run_uri, identity)


def verify_exactly_once(out: str, prompts: list[Prompt]) -> int:
    """Every prompt has blocks 0..k-1 exactly once and nothing else is there; returns the row count."""
    table = read_dataset(out, schema=TRAJECTORY_SCHEMA, columns=["prompt_id", "block_index"])
    blocks: dict[str, list[int]] = defaultdict(list)
    for prompt_id, index in zip(table.column("prompt_id").to_pylist(), table.column("block_index").to_pylist()):
        blocks[prompt_id].append(index)
    expected = {p.id for p in prompts}
    missing, extra = expected - set(blocks), set(blocks) - expected
    broken = [pid for pid, idx in blocks.items() if sorted(idx) != list(range(len(idx)))]
    if missing or extra or broken:
        raise DatasetError(
            f"{out}: not every prompt exactly once (missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}, "
            f"duplicated/gapped blocks {broken[:5]})"
        )
    return table.num_rows


def check_backend(config: CollectConfig) -> None:
    """Refuse, before anything is read or written, a backend that cannot run the model (vLLM: docs/vllm.md)."""
    if config.backend != "vllm":
        return
    from jf_ray.modeling import local_model_path
    from jf_ray.vllm_engine import check_vllm_model

    if config.tensor_parallel_size > max(config.num_gpus_per_worker, 1):
        raise UserInputError(
            f"tensor_parallel_size {config.tensor_parallel_size} needs num_gpus_per_worker >= that many GPUs"
        )
    # Only a local cluster's memory is this machine's: on a remote one the actors report what they lack.
    engines = config.workers if config.ray_address is None else 0
    check_vllm_model(local_model_path(config.model), config.backend_spec().vllm_options(), engines)


def collect(config: CollectConfig, on_shard_done: Callable[[dict], None] | None = None) -> dict:
    """Collect trajectories as configured on the Ray cluster this process has joined (its entry point joins
    or starts one: docs/cluster.md); returns a summary (counts, tokens/s, per-worker throughput)."""
    from jf_ray.raycluster import require_fit
    from jf_ray.trajectories.ray_pool import PoolOptions, run_shards

    start, retries_before = time.perf_counter(), retry_count()
    check_backend(config)
    prompts = read_prompts(config.prompts)
    tasks = plan_tasks(prompts, config)
    writer = DatasetWriter(config.out, TRAJECTORY_SCHEMA)
    if not config.resume:
        writer.reset()  # before the new identity is recorded: no old shard may pass as part of this run
    check_resumable(config, run_identity(prompts, config))
    finished = set(writer.finished_shards(verify=True)) if config.resume else set()
    todo = [t for t in tasks if t.name not in finished]
    logger.info(
        "collect: %d prompts in %d shards, %d already finished, %d to do",
        len(prompts),
        len(tasks),
        len(tasks) - len(todo),
        len(todo),
    )
    reports, retries = [], []
    if todo:
        require_fit({"CPU": config.num_cpus_per_worker, "GPU": config.num_gpus_per_worker}, "a collection actor")
        options = PoolOptions(
            config.workers,
            config.num_cpus_per_worker,
            config.num_gpus_per_worker,
            config.max_shard_attempts,
            config.progress,
        )
        outcome = run_shards(todo, _settings(config), config.backend_spec(), options, on_shard_done)
        reports, retries = outcome.reports, outcome.retries
    writer.commit(_manifest_meta(config, prompts), expected_shards=[t.name for t in tasks])
    rows = verify_exactly_once(config.out, prompts)
    summary = _summary(config, prompts, tasks, reports, retries, rows, time.perf_counter() - start)
    summary["storage_retries"] = _storage_retries(reports, retry_count() - retries_before)
    return summary


def _storage_retries(reports: list[dict], driver: int) -> int:
    """Storage operations retried after transient errors, by the driver and by the workers' shards."""
    total = driver + sum(r.get("storage_retries", 0) for r in reports)
    if total:
        logger.warning("collect: %d storage operations were retried after transient errors (all succeeded)", total)
    return total


def _settings(config: CollectConfig) -> RecordSettings:
    return RecordSettings(
        out=config.out,
        block_size=config.block_size,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        model_id=config.resolved_model_id,
        round_index=config.round,
    )


def _manifest_meta(config: CollectConfig, prompts: list[Prompt]) -> dict:
    return {
        "stage": "collect",
        "model": config.model,
        "model_id": config.resolved_model_id,
        "round": config.round,
        "block_size": config.block_size,
        "max_new_tokens": config.max_new_tokens,
        "prompts": config.prompts,
        "num_prompts": len(prompts),
        "seed": config.seed,
        "backend": config.backend,
        "initial_state": "true initial draft (official data stores the fixed point as state 0)",
    }


def _summary(config, prompts, tasks, reports, retries, rows, wall_s) -> dict:
    tokens = sum(r["tokens"] for r in reports)
    forwards = sum(r["forwards"] for r in reports)
    per_worker: dict[int, dict] = {}
    for r in reports:
        w = per_worker.setdefault(
            r["worker"],
            {"worker": r["worker"], "shards": 0, "prompts": 0, "tokens": 0, "forwards": 0, "busy_s": 0.0},
        )
        for key, value in (
            ("shards", 1),
            ("prompts", r["prompts"]),
            ("tokens", r["tokens"]),
            ("forwards", r["forwards"]),
            ("busy_s", r["shard_s"]),
        ):
            w[key] += value
    for w in per_worker.values():
        w["tokens_per_s"] = round(w["tokens"] / w["busy_s"], 2) if w["busy_s"] else 0.0
        w["busy_s"] = round(w["busy_s"], 3)
    return {
        "out": config.out,
        "prompts": len(prompts),
        "shards": len(tasks),
        "shards_run": len(reports),
        "shards_skipped": len(tasks) - len({r["shard"] for r in reports}),
        "shard_names_run": sorted(r["shard"] for r in reports),
        "retries": retries,
        "rows": rows,
        "tokens": tokens,
        "forwards": forwards,
        "tpf": round(tokens / forwards, 4) if forwards else 0.0,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0,
        "workers": [per_worker[k] for k in sorted(per_worker)],
    }

"""Ray layer of collection: a pool of actors, each owning a :class:`ShardWorker`, fed shards one at a time.

Failure handling is explicit rather than delegated to Ray's actor restarts, so that the driver knows which
shard was lost: an actor that dies (killed, OOM, node lost) is replaced, and its shard goes back to the
front of the queue, preferring a different actor slot; a shard that keeps failing aborts the run after
``max_attempts``. Workers write their own shards, so the driver never holds trajectory data.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from jf_ray.trajectories.backend_base import BackendSpec
from jf_ray.trajectories.worker import RecordSettings, ShardTask, ShardWorker

logger = logging.getLogger(__name__)

# Storage settings the driver was given travel to the actors (object store endpoint, credentials, caches).
# Not AWS_EC2_METADATA_DISABLED: on a real cluster the actors' own instance profile must stay usable.
FORWARDED_ENV_VARS = (
    "JF_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "JF_S3_MAX_ATTEMPTS",
    "JF_STORAGE_ATTEMPTS",
    "JF_STORAGE_RETRY_BASE_S",
    "JF_CACHE_DIR",
    "HF_HOME",
)


class CollectionFailed(RuntimeError):
    """A shard failed ``max_attempts`` times; the message carries its last error."""


@ray.remote
class CollectActor:
    def __init__(self, settings: RecordSettings, spec: BackendSpec, num_threads: int, name: str):
        from jf_ray.modeling import set_torch_threads

        set_torch_threads(num_threads)
        self.name = name
        self.worker = ShardWorker(settings, spec)

    def run(self, task: ShardTask) -> dict:
        return {**self.worker.run(task), "actor": self.name}


@dataclass
class PoolOptions:
    workers: int
    num_cpus: float
    num_gpus: float
    max_attempts: int
    progress: bool = True


@dataclass
class _Pending:
    task: ShardTask
    attempts: int = 0
    failed_slots: set[int] = field(default_factory=set)


@dataclass
class PoolOutcome:
    reports: list[dict]
    retries: list[dict]


class ShardPool:
    """``workers`` actor slots; a slot whose actor died gets a fresh actor."""

    def __init__(self, settings: RecordSettings, spec: BackendSpec, options: PoolOptions):
        self.settings, self.spec, self.options = settings, spec, options
        self.run_tag = f"jf-collect-{uuid.uuid4().hex[:8]}"
        self.generation = [0] * options.workers
        self.actors = [self._spawn(i) for i in range(options.workers)]
        self.busy: list[_Pending | None] = [None] * options.workers

    def actor_name(self, slot: int) -> str:
        return f"{self.run_tag}-w{slot}-g{self.generation[slot]}"

    def _spawn(self, slot: int):
        env = {k: os.environ[k] for k in FORWARDED_ENV_VARS if k in os.environ}
        threads = max(1, int(self.options.num_cpus))
        return CollectActor.options(
            name=self.actor_name(slot),
            num_cpus=self.options.num_cpus,
            num_gpus=self.options.num_gpus,
            runtime_env={"env_vars": env} if env else None,
        ).remote(self.settings, self.spec, threads, self.actor_name(slot))

    def _respawn(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.generation[slot] += 1
        self.actors[slot] = self._spawn(slot)

    def run(self, tasks: list[ShardTask], on_report: Callable[[dict], None]) -> PoolOutcome:
        pending = deque(_Pending(t) for t in tasks)
        inflight: dict = {}
        outcome = PoolOutcome(reports=[], retries=[])
        while pending or inflight:
            self._assign(pending, inflight)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, item = inflight.pop(ref)
            self.busy[slot] = None
            try:
                report = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                died = isinstance(exc, ray.exceptions.RayActorError)
                self._retry(item, slot, exc, pending, outcome, died)
                continue
            report["worker"] = slot
            outcome.reports.append(report)
            on_report(report)
        return outcome

    def _assign(self, pending: deque, inflight: dict) -> None:
        """Give each idle slot the first pending shard that has not already failed on it."""
        for slot in range(self.options.workers):
            if self.busy[slot] is not None:
                continue
            item = next((p for p in pending if self._eligible(p, slot)), None)
            if item is None:
                continue
            pending.remove(item)
            item.attempts += 1
            self.busy[slot] = item
            inflight[self.actors[slot].run.remote(item.task)] = (slot, item)

    def _eligible(self, item: _Pending, slot: int) -> bool:
        return slot not in item.failed_slots or len(item.failed_slots) >= self.options.workers

    def _retry(self, item: _Pending, slot: int, exc: Exception, pending: deque, outcome: PoolOutcome, died: bool):
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        outcome.retries.append({"shard": item.task.name, "worker": slot, "actor_died": died, "error": error[:300]})
        logger.warning(
            "shard %s failed on worker %d (%s): %s",
            item.task.name,
            slot,
            "actor died" if died else "task error",
            error[:300],
        )
        if died:
            self._respawn(slot)
        if item.attempts >= self.options.max_attempts:
            raise CollectionFailed(f"shard {item.task.name} failed {item.attempts} times; last error: {error}")
        item.failed_slots.add(slot)
        pending.appendleft(item)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_shards(
    tasks: list[ShardTask],
    settings: RecordSettings,
    spec: BackendSpec,
    options: PoolOptions,
    on_report: Callable[[dict], None] | None = None,
) -> PoolOutcome:
    """Run every task on a fresh pool with a driver-side progress bar; actors are removed at the end."""
    total = sum(len(t.prompts) for t in tasks)
    per_worker: dict[int, list[float]] = {}
    with tqdm(total=total, unit="prompt", desc="collect", disable=not options.progress) as bar:

        def report_progress(report: dict) -> None:
            tokens_s = per_worker.setdefault(report["worker"], [0.0, 0.0])
            tokens_s[0] += report["tokens"]
            tokens_s[1] += report["shard_s"]
            bar.update(report["prompts"])
            bar.set_postfix_str(" ".join(f"w{w}:{t / s:.0f}tok/s" for w, (t, s) in sorted(per_worker.items()) if s))
            if on_report is not None:
                on_report(report)

        pool = ShardPool(settings, spec, options)
        try:
            return pool.run(tasks, report_progress)
        finally:
            pool.shutdown()

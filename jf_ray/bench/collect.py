"""``jf-ray bench collect``: trajectory collection's tokens/s with 1..W Ray workers, and batch-size scaling in
one worker, for each generation backend (``transformers``, ``vllm``: docs/vllm.md). See docs/benchmarking.md.

Worker scaling runs the real ``collect`` (actors, shards, storage) and reports the end-to-end rate (actor
start-up and model loading included) next to the steady rate (tokens over the busiest worker's shard time).
Batch scaling runs one :class:`ShardWorker` in this process with ``threads`` torch threads, as an actor with
that many CPUs would. Ray must be initialized by the caller (the CLI joins or starts a cluster).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass

from tqdm import tqdm

from jf_ray.bench.common import MachineRecord
from jf_ray.prompts import read_prompts
from jf_ray.storage import join_uri
from jf_ray.trajectories.backends import BackendSpec, make_backend
from jf_ray.trajectories.config import CollectConfig
from jf_ray.trajectories.worker import RecordSettings, ShardTask, ShardWorker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectBench:
    """What ``jf-ray bench collect`` runs: every backend, at every worker count and every batch size."""

    model: str
    prompts: str  # JSONL URI
    workers: list[int]
    batch_sizes: list[int]  # of the in-process batch scaling
    batch_size: int = 8  # of the worker-scaling runs
    shard_size: int = 16
    block_size: int = 16
    max_new_tokens: int = 64
    threads: int = 1  # torch threads of the in-process worker
    backends: tuple[str, ...] = ("transformers",)
    vllm_eager: bool = False  # vLLM without compilation (starts faster)


def worker_scaling(bench: CollectBench, scratch: str, backend: str) -> list[dict]:
    from jf_ray.trajectories.collect import collect

    results = []
    for workers in bench.workers:
        config = CollectConfig(
            model=bench.model,
            prompts=bench.prompts,
            out=join_uri(scratch, f"{backend}-workers-{workers}"),
            backend=backend,
            dtype="fp32",
            vllm_enforce_eager=bench.vllm_eager,
            block_size=bench.block_size,
            max_new_tokens=bench.max_new_tokens,
            workers=workers,
            batch_size=bench.batch_size,
            shard_size=bench.shard_size,
            progress=True,  # collect's own bar, one per worker count
        )
        summary = collect(config)
        busiest = max(w["busy_s"] for w in summary["workers"])
        results.append(
            {
                "backend": backend,
                "workers": workers,
                "tokens": summary["tokens"],
                "tpf": summary["tpf"],
                "wall_s": summary["wall_s"],
                "end_to_end_tokens_per_s": summary["tokens_per_s"],
                "steady_tokens_per_s": round(summary["tokens"] / busiest, 2),
                "per_worker": summary["workers"],
            }
        )
        logger.info("%s workers=%d: %s", backend, workers, results[-1])
    return results


def batch_scaling(bench: CollectBench, scratch: str, name: str, bar: tqdm) -> list[dict]:
    from jf_ray.modeling import set_torch_threads

    set_torch_threads(bench.threads)
    prompts = tuple(read_prompts(bench.prompts))
    spec = BackendSpec(
        name=name,
        model=bench.model,
        device="cpu",
        dtype="fp32",
        num_threads=bench.threads,
        vllm_enforce_eager=bench.vllm_eager,
    )
    backend = make_backend(spec)
    results = []
    for batch_size in bench.batch_sizes:
        settings = RecordSettings(
            out=join_uri(scratch, f"{name}-batch-{batch_size}"),
            block_size=bench.block_size,
            max_new_tokens=bench.max_new_tokens,
            batch_size=batch_size,
            model_id=bench.model,
            round_index=1,
        )
        report = ShardWorker(settings, backend=backend).run(ShardTask("shard-00000", prompts, seed=0))
        results.append(
            {
                "backend": name,
                "batch_size": batch_size,
                "tokens": report["tokens"],
                "forwards": report["forwards"],
                "generate_s": report["generate_s"],
                "tokens_per_s": round(report["tokens"] / report["generate_s"], 2),
                "shard_s": report["shard_s"],
            }
        )
        bar.update(1)
        logger.info("%s batch=%d: %s", name, batch_size, results[-1])
    return results


def bench_collection(bench: CollectBench, scratch: str | None = None) -> dict:
    """The report: batch scaling, then worker scaling, of every backend; datasets go under ``scratch``."""
    machine = MachineRecord.start()
    scratch = scratch or tempfile.mkdtemp(prefix="jf-collect-bench-")
    cells = len(bench.backends) * len(bench.batch_sizes)
    with tqdm(total=cells, desc="bench collect (batch sizes)", unit="run") as bar:
        by_batch = [row for b in bench.backends for row in batch_scaling(bench, scratch, b, bar)]
    by_workers = [row for b in bench.backends for row in worker_scaling(bench, scratch, b)]
    return {
        "benchmark": "collect",
        "settings": asdict(bench),
        "num_prompts": len(read_prompts(bench.prompts)),
        "batch_scaling": by_batch,
        "worker_scaling": by_workers,
        "machine": machine.finish("fp32"),
    }

"""``jf-ray bench train``: packed tokens/s of Jacobi Forcing training with 1, 2, ... Ray Train workers.

Each worker count is one short TorchTrainer run (its own run name under a scratch ``out``); the figures come
from the run's metrics log: the median of per-step tokens/s after ``skip`` warm-up steps, and the mean over
the same steps (total tokens / total step time). Tokens are packed tokens (prompt + noisy + clean + anchors)
summed over workers. Ray must be initialized by the caller (the CLI joins or starts a cluster). See
docs/benchmarking.md.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time

from tqdm import tqdm

from jf_ray.bench.common import MachineRecord
from jf_ray.training.config import TrainConfig

logger = logging.getLogger(__name__)


def measure(config: TrainConfig, skip: int) -> dict:
    """Run ``config`` once; throughput over the steps after the first ``skip``."""
    from jf_ray.storage import read_bytes
    from jf_ray.training.ray_train import train

    summary = train(config)
    steps = [json.loads(line) for line in read_bytes(summary["metrics_log"]).decode().splitlines() if line]
    timed = steps[skip:] or steps
    return {
        "workers": config.workers,
        "steps": len(steps),
        "tokens_per_s_median": round(statistics.median(s["tokens_per_s"] for s in timed), 1),
        "tokens_per_s_mean": round(sum(s["tokens"] for s in timed) / sum(s["step_s"] for s in timed), 1),
        "tokens_per_step": round(statistics.mean(s["tokens"] for s in timed), 1),
        "final_loss": steps[-1]["loss"],
        "fit_wall_s": summary["wall_s"],
    }


def bench_training(
    model: str,
    data: str,
    workers: list[int],
    steps: int = 20,
    skip: int = 3,
    out: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """The report: one short run per worker count; ``overrides`` are TrainConfig ``KEY=VALUE`` settings."""
    from jf_ray.precision import resolve_precision

    machine = MachineRecord.start()
    out = out or f"file://{tempfile.mkdtemp(prefix='jf-train-bench-')}"
    results = []
    for count in tqdm(workers, desc="bench train", unit="run"):
        settings = [
            f"model={model}",
            f"data={data}",
            f"out={out}",
            f"workers={count}",
            f"steps={steps}",
            f"run_name=bench-w{count}-{int(time.time())}",
            *(overrides or []),
        ]
        config = TrainConfig.load(None, settings)
        results.append(measure(config, skip))
        logger.info("workers=%d: %.0f tokens/s", count, results[-1]["tokens_per_s_median"])
    return {
        "benchmark": "train",
        "settings": {"model": model, "data": data, "steps": steps, "skip": skip, "set": list(overrides or [])},
        "results": results,
        "machine": machine.finish(resolve_precision(config.precision, "cuda" if config.use_gpu else "cpu").name),
    }

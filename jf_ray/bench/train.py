"""Training throughput benchmark: packed tokens/s of Jacobi Forcing training with 1, 2, ... workers.

    python -m jf_ray.training.bench --model CKPT --data PACKED_URI --workers 1,2 --steps 20 --json-out b.json

Each worker count is one short TorchTrainer run (its own run name under a scratch ``--out``); the figures
come from the run's metrics log: the median of per-step tokens/s after ``--skip`` warm-up steps, and the
mean over the same steps (total tokens / total step time). Tokens are packed tokens (prompt + noisy +
clean + anchors) summed over workers. Also records the load average, since the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

from jf_ray.training.config import TrainConfig

logger = logging.getLogger(__name__)


def measure(config: TrainConfig, skip: int) -> dict:
    """Run ``config`` once; throughput over the steps after the first ``skip``."""
    from jf_ray.storage import read_bytes
    from jf_ray.training.ray_train import train

    load_before = os.getloadavg()[0]
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
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jf_ray.training.bench", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="packed dataset URI")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures")
    parser.add_argument("--out", default=None, help="scratch URI for the runs (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or f"file://{tempfile.mkdtemp(prefix='jf-train-bench-')}"
    results = []
    for workers in [int(w) for w in args.workers.split(",")]:
        overrides = [
            f"model={args.model}",
            f"data={args.data}",
            f"out={out}",
            f"workers={workers}",
            f"steps={args.steps}",
            f"run_name=bench-w{workers}-{int(time.time())}",
            *args.set,
        ]
        results.append(measure(TrainConfig.load(None, overrides), args.skip))
        logger.info("workers=%d: %.0f tokens/s", workers, results[-1]["tokens_per_s_median"])
    report = {
        "benchmark": "jf_ray.training",
        "cpu_count": os.cpu_count(),
        "results": results,
        "settings": {"model": args.model, "data": args.data, "steps": args.steps, "set": args.set},
    }
    with open(args.json_out, "w") as handle:
        json.dump(report, handle, indent=2)
    logger.info("wrote %s", args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

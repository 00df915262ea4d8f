"""Benchmark of trajectory collection: tokens/s with 1..W Ray workers, and batch-size scaling in one worker,
for each generation backend (``transformers``, ``vllm``: docs/vllm.md).

    python -m jf_ray.trajectories.bench --model CKPT --prompts prompts.jsonl --json-out bench.json \\
        --workers 1,2 --batch-sizes 1,4,16 --block-size 16 --max-new-tokens 64 --backends transformers,vllm

Worker scaling runs the real ``collect`` (actors, shards, storage) and reports the end-to-end rate (actor
start-up and model loading included) next to the steady rate (tokens over the busiest worker's shard time).
Batch scaling runs one :class:`ShardWorker` in this process with ``--threads`` torch threads, as an actor
with that many CPUs would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time

import torch

from jf_ray.prompts import read_prompts
from jf_ray.storage import join_uri, write_bytes_atomic
from jf_ray.trajectories.backends import BackendSpec, make_backend
from jf_ray.trajectories.config import CollectConfig
from jf_ray.trajectories.worker import RecordSettings, ShardTask, ShardWorker

logger = logging.getLogger(__name__)


def worker_scaling(args, prompts_uri: str, scratch: str, backend: str) -> list[dict]:
    from jf_ray.trajectories.collect import collect

    results = []
    for workers in args.workers:
        config = CollectConfig(
            model=args.model,
            prompts=prompts_uri,
            out=join_uri(scratch, f"{backend}-workers-{workers}"),
            backend=backend,
            dtype="fp32",
            vllm_enforce_eager=args.vllm_eager,
            block_size=args.block_size,
            max_new_tokens=args.max_new_tokens,
            workers=workers,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            progress=False,
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
        logger.info("workers=%d: %s", workers, results[-1])
    return results


def batch_scaling(args, prompts_uri: str, scratch: str, name: str) -> list[dict]:
    torch.set_num_threads(args.threads)
    prompts = tuple(read_prompts(prompts_uri))
    spec = BackendSpec(
        name=name,
        model=args.model,
        device="cpu",
        dtype="fp32",
        num_threads=args.threads,
        vllm_enforce_eager=args.vllm_eager,
    )
    backend = make_backend(spec)
    results = []
    for batch_size in args.batch_sizes:
        settings = RecordSettings(
            out=join_uri(scratch, f"{name}-batch-{batch_size}"),
            block_size=args.block_size,
            max_new_tokens=args.max_new_tokens,
            batch_size=batch_size,
            model_id=args.model,
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
        logger.info("batch=%d: %s", batch_size, results[-1])
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL URI")
    parser.add_argument("--json-out", required=True, help="where the results JSON goes (URI or path)")
    parser.add_argument("--workers", type=_ints, default=[1, 2])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the worker-scaling runs")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process worker")
    parser.add_argument("--backends", type=lambda text: text.split(","), default=["transformers"])
    parser.add_argument("--vllm-eager", action="store_true", help="vllm without compilation (starts faster)")
    parser.add_argument("--scratch", default=None, help="URI for the datasets written (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    scratch = args.scratch or tempfile.mkdtemp(prefix="jf-collect-bench-")
    start = time.time()
    result = {
        "benchmark": "trajectory_collection",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        # Other processes on a shared machine skew every number; keep the load beside them.
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json_out", "scratch")},
        "num_prompts": len(read_prompts(args.prompts)),
        "batch_scaling": [row for b in args.backends for row in batch_scaling(args, args.prompts, scratch, b)],
        "worker_scaling": [row for b in args.backends for row in worker_scaling(args, args.prompts, scratch, b)],
    }
    result["load_average_end"] = os.getloadavg()
    result["total_s"] = round(time.time() - start, 1)
    write_bytes_atomic(args.json_out, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()

"""``jf-ray collect``: Jacobi trajectories of a model on a prompt set, on a Ray actor pool, into a dataset.

Re-running with the same ``--out`` resumes: finished shards are skipped (checksums verified), unfinished
or corrupt ones are redone. Settings: a CollectConfig from ``--config`` YAML, then flags, then
``--set key=value``.
"""

from __future__ import annotations

import json

from jf_ray.cli.common import (
    PROMPTS_HELP,
    FieldFlag,
    add_address_option,
    add_config_options,
    config_from_args,
    join_or_start_ray,
)

FLAGS = (
    FieldFlag("--model", "checkpoint: local dir, file:// or s3:// URI", required=True),
    FieldFlag("--prompts", PROMPTS_HELP, required=True),
    FieldFlag("--out", "output dataset URI (file://, s3:// or a path)", required=True),
    FieldFlag("--block-size", "Jacobi block size n", int),
    FieldFlag("--workers", "Ray actors (one per GPU on clusters)", int),
    FieldFlag("--batch-size", "prompts decoded together in one worker", int),
    FieldFlag("--max-new-tokens", "cap on new tokens per prompt (rounded up to whole blocks)", int),
    FieldFlag("--round", "Jacobi Forcing round stored in every row", int),
    FieldFlag("--model-id", "model id stored in every row (default: --model)"),
    FieldFlag("--num-gpus-per-worker", "GPUs per actor (0 on CPU)", float),
    FieldFlag("--backend", "transformers | vllm (docs/vllm.md) | package.module:Class"),
    FieldFlag("--tensor-parallel-size", "vllm: GPUs one engine spans", int),
    FieldFlag("--resume", "skip finished shards of --out (default) or redo everything", bool),
    FieldFlag("--progress", "progress bar", bool),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "collect", help="collect Jacobi trajectories into a Parquet dataset", description=__doc__
    )
    add_config_options(parser, "CollectConfig", FLAGS)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_address_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from jf_ray.storage import check_writable
    from jf_ray.trajectories.collect import collect
    from jf_ray.trajectories.config import CollectConfig

    config = config_from_args(CollectConfig, args, FLAGS)
    join_or_start_ray(args)
    check_writable(config.out, "--out")
    summary = collect(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    print(
        f"collected {summary['prompts']} prompts into {summary['out']}: {summary['shards']} shards "
        f"({summary['shards_run']} run, {summary['shards_skipped']} skipped, {len(summary['retries'])} retries), "
        f"{summary.get('storage_retries', 0)} storage operations retried, "
        f"{summary['rows']} blocks"
    )
    print(
        f"{summary['tokens']} new tokens in {summary['wall_s']:.1f}s = {summary['tokens_per_s']:.1f} tok/s "
        f"(TPF {summary['tpf']:.2f})"
    )
    if summary["workers"]:
        print(f"{'worker':>6} {'shards':>6} {'prompts':>7} {'tokens':>8} {'busy s':>8} {'tok/s':>8}")
        for w in summary["workers"]:
            print(
                f"{w['worker']:>6} {w['shards']:>6} {w['prompts']:>7} {w['tokens']:>8} {w['busy_s']:>8.1f} "
                f"{w['tokens_per_s']:>8.1f}"
            )

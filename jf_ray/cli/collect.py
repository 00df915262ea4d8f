"""``jf-ray collect``: Jacobi trajectories of a model on a prompt set, on a Ray actor pool, into a dataset.

Re-running with the same ``--out`` resumes: finished shards are skipped (checksums verified), unfinished
or corrupt ones are redone. Settings come from ``--config`` YAML, then ``--set key=value``, then flags.
"""

from __future__ import annotations

import argparse
import json

from jf_ray.cli.common import add_address_option, join_or_start_ray

# Flags that map one-to-one onto CollectConfig fields (flag dest == field name).
_FIELD_FLAGS = (
    ("--model", str, "checkpoint: local dir, file:// or s3:// URI"),
    ("--prompts", str, 'JSONL URI, one {"prompt": ..., "id"?: ...} per line'),
    ("--out", str, "output dataset URI (file://, s3:// or a path)"),
    ("--block-size", int, "Jacobi block size n"),
    ("--workers", int, "Ray actors (one per GPU on clusters)"),
    ("--batch-size", int, "prompts decoded together in one worker"),
    ("--max-new-tokens", int, "cap on new tokens per prompt (rounded up to whole blocks)"),
    ("--round", int, "Jacobi Forcing round stored in every row"),
    ("--model-id", str, "model id stored in every row (default: --model)"),
    ("--num-gpus-per-worker", float, "GPUs per actor (0 on CPU)"),
    ("--backend", str, "transformers | vllm (docs/vllm.md) | package.module:Class"),
    ("--tensor-parallel-size", int, "vllm: GPUs one engine spans"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "collect", help="collect Jacobi trajectories into a Parquet dataset", description=__doc__
    )
    parser.add_argument("--config", help="YAML file with CollectConfig fields")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any CollectConfig field (repeatable), e.g. --set shard_size=64",
    )
    for flag, kind, text in _FIELD_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip finished shards of --out (default) or redo everything",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_address_option(parser)
    parser.set_defaults(func=run)


def build_config(args):
    from jf_ray.config import parse_override, read_yaml, set_dotted
    from jf_ray.trajectories.config import CollectConfig

    data = read_yaml(args.config) if args.config else {}
    for item in args.set:
        set_dotted(data, *parse_override(item))
    for flag, _, _ in _FIELD_FLAGS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for name in ("resume", "progress"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    return CollectConfig.from_dict(data)


def run(args) -> int:
    from jf_ray.storage import check_writable
    from jf_ray.trajectories.collect import collect

    config = build_config(args)
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

"""``jf-ray pack``: Jacobi trajectories -> packed training sequences (a Ray Data job over the shards).

Each response becomes ``prompt ++ (noisy_j ++ clean_j)_j``; the noisy block is the recorded state nearest
the block's target noise ratio (progressive: cyclic ramp over --window blocks). Settings: a PackConfig from
``--config`` YAML, then flags, then ``--set key=value``.
"""

from __future__ import annotations

import json

from jf_ray.cli.common import FieldFlag, add_address_option, add_config_options, config_from_args, join_or_start_ray

FLAGS = (
    FieldFlag("--trajectories", "URI of the trajectory dataset (schema jf_ray.trajectories)", required=True),
    FieldFlag("--out", "URI of the packed dataset to write", required=True),
    FieldFlag("--window", "noise-schedule window W in blocks", int),
    FieldFlag("--strategy", "noise schedule: progressive | random | reverse"),
    FieldFlag("--seed", "seed of the random strategy", int),
    FieldFlag("--max-tokens", "cap on packed sequence length (leading blocks kept)", int),
    FieldFlag("--rows-per-shard", "packed sequences per output shard", int),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack", help="pack trajectories into Jacobi Forcing training sequences", description=__doc__
    )
    add_config_options(parser, "PackConfig", FLAGS)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_address_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from jf_ray.packing.config import PackConfig
    from jf_ray.packing.ray_pack import pack
    from jf_ray.storage import check_writable

    config = config_from_args(PackConfig, args, FLAGS)
    join_or_start_ray(args)
    check_writable(config.out, "--out")
    summary = pack(config)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"packed {summary['packed']} of {summary['responses']} responses into {summary['out']} "
        f"({summary['shards']} shards, {summary['blocks']} blocks, {summary['tokens']} tokens, "
        f"{summary['truncated']} truncated) in {summary['wall_s']:.1f}s"
    )
    skipped = {reason: count for reason, count in summary["skipped"].items() if count}
    if skipped:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in skipped.items()))
    return 0

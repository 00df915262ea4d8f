"""``jf-ray pack``: Jacobi trajectories -> packed training sequences (a Ray Data job over the shards).

Each response becomes ``prompt ++ (noisy_j ++ clean_j)_j``; the noisy block is the recorded state nearest
the block's target noise ratio (progressive: cyclic ramp over --window blocks). Settings come from
``--config`` YAML, then ``--set key=value``, then flags.
"""

from __future__ import annotations

import argparse
import json

from jf_ray.cli.common import add_address_option, join_or_start_ray

# Flags that map one-to-one onto PackConfig fields (flag dest == field name).
_FIELD_FLAGS = (
    ("--trajectories", str, "URI of the trajectory dataset (schema jf_ray.trajectories)"),
    ("--out", str, "URI of the packed dataset to write"),
    ("--window", int, "noise-schedule window W in blocks"),
    ("--strategy", str, "progressive | random | reverse"),
    ("--seed", int, "seed of the random strategy"),
    ("--max-tokens", int, "cap on packed sequence length (leading blocks kept)"),
    ("--rows-per-shard", int, "packed sequences per output shard"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pack", help="pack trajectories into Jacobi Forcing training sequences", description=__doc__
    )
    add_config_options(parser, "PackConfig", _FIELD_FLAGS)
    parser.set_defaults(func=run)


def add_config_options(parser: argparse.ArgumentParser, config_name: str, field_flags) -> None:
    parser.add_argument("--config", help=f"YAML file with {config_name} fields")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any {config_name} field (repeatable; dotted keys for sections)",
    )
    for flag, kind, text in field_flags:
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_address_option(parser)


def config_from_args(config_class, args: argparse.Namespace, field_flags, renames: dict | None = None):
    """YAML, then ``--set`` overrides, then explicit flags; flag ``--a-b`` sets field ``a_b`` (or a rename)."""
    from jf_ray.config import parse_override, read_yaml, set_dotted

    data = read_yaml(args.config) if args.config else {}
    for item in args.set:
        set_dotted(data, *parse_override(item))
    for flag, _, _ in field_flags:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is not None:
            set_dotted(data, (renames or {}).get(dest, dest), getattr(args, dest))
    return config_class.from_dict(data)


def run(args) -> int:
    from jf_ray.packing.config import PackConfig
    from jf_ray.packing.ray_pack import pack
    from jf_ray.storage import check_writable

    config = config_from_args(PackConfig, args, _FIELD_FLAGS)
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

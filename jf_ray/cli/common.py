"""Argument types and options shared by several ``jf-ray`` subcommands (light imports only), and the one
config builder of every subcommand that builds a stage config (docs/README.md, "Settings on the command line").

Precedence, lowest first: the ``--config`` YAML, then explicit flags, then ``--set KEY=VALUE`` (dotted keys
reach into sections). A flag left out sets nothing, so the YAML's value (or the config's default) stays.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from jf_ray.config import DTYPE_NAMES
from jf_ray.decoding.registry import DECODER_NAMES, canonical

# Every --prompts that takes a prompt list (jf_ray.prompts.read_prompts reads them all).
PROMPTS_HELP = (
    'JSONL file or URI, one {"prompt": ..., "id"?: ...} per line, or a Hugging Face dataset (hf://datasets/NAME, '
    "a save_to_disk dir, Parquet/JSON/CSV) with ?column=NAME or ?template={NAME} naming the prompt (docs/pipeline.md)"
)
PRECEDENCE = (
    "Settings are layered, later wins: the --config YAML, then explicit flags, then --set KEY=VALUE "
    "(dotted keys reach into sections, e.g. --set decode.num_blocks=3)."
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def decoder_name(text: str, allowed: tuple[str, ...] = DECODER_NAMES) -> str:
    """A decoder's public name (aliases such as ``mr`` map to theirs)."""
    try:
        return canonical(text.strip(), allowed)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def decoder_list(text: str, allowed: tuple[str, ...] = DECODER_NAMES) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no decoder given")
    return [decoder_name(name, allowed) for name in names]


def add_address_option(parser: argparse.ArgumentParser) -> None:
    """``--address`` for every subcommand that runs on Ray (see docs/cluster.md)."""
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: GCS host:port, ray://host:port or auto (default: RAY_ADDRESS, which "
        "`ray job submit` sets; without either, a private local cluster is started)",
    )


def join_or_start_ray(args: argparse.Namespace, num_cpus: int | None = None) -> bool:
    """Join ``--address`` (or RAY_ADDRESS) or start a local cluster, before anything else imports ray.

    Returns True when this call started a local cluster (the command then owns its shutdown)."""
    import sys

    from jf_ray.raycluster import init_ray, resolve_address

    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    init_ray(args.address, num_cpus=num_cpus)
    return not running and resolve_address(args.address) is None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint dir, file:// or s3:// URI, or hub name")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=positive_int, default=64, help="Jacobi block size n")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--num-blocks", type=positive_int, default=2, help="multiblock: blocks in flight K")
    parser.add_argument("--pool-size", type=int, default=4, help="multiblock, auto: most candidates per forward")
    parser.add_argument("--spawn-ratio", type=float, default=0.85, help="multiblock: spawn at ceil(r*n) accepted")
    parser.add_argument("--no-recycle-context", action="store_true", help="multiblock, auto: no copied candidates")
    parser.add_argument("--seed", type=int, default=0)


def decode_config_from_args(args: argparse.Namespace, decoder: str = "jacobi"):
    from jf_ray.decoding import DecodeConfig

    return DecodeConfig.from_dict(
        {
            "decoder": decoder,
            "block_size": args.block_size,
            "max_new_tokens": args.max_new_tokens,
            "num_blocks": args.num_blocks,
            "pool_size": args.pool_size,
            "spawn_ratio": args.spawn_ratio,
            "recycle_context": not args.no_recycle_context,
            "seed": args.seed,
        }
    )


@dataclass(frozen=True)
class FieldFlag:
    """A flag that sets one field of a stage config; left out, it sets nothing."""

    flag: str
    help: str
    type: Callable[[str], Any] = str  # bool: --flag / --no-flag
    key: str = ""  # dotted field it sets; default: the flag's name (--block-size -> block_size)
    choices: tuple[str, ...] | None = None
    required: bool = False  # must be set by one of the layers; the error names the flag

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def field(self) -> str:
        return self.key or self.dest


def add_config_options(parser: argparse.ArgumentParser, config_name: str, flags: Iterable[FieldFlag]) -> None:
    """``--config``, one flag per :class:`FieldFlag` and ``--set``; the precedence goes into ``--help``."""
    parser.add_argument("--config", default=None, metavar="YAML", help=f"YAML file of {config_name} fields")
    for spec in flags:
        if spec.type is bool:
            parser.add_argument(spec.flag, action=argparse.BooleanOptionalAction, default=None, help=spec.help)
        else:
            parser.add_argument(spec.flag, type=spec.type, choices=spec.choices, default=None, help=spec.help)
    add_set_option(parser, config_name)
    parser.epilog = PRECEDENCE


def add_set_option(parser: argparse.ArgumentParser, config_name: str) -> None:
    """Repeatable ``--set KEY=VALUE`` into ``args.overrides``: the last, winning layer of the settings."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set any {config_name} field (repeatable; dotted keys for sections; wins over --config and flags)",
    )


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` with every ``KEY=VALUE`` of ``overrides`` set in order (values parsed as YAML scalars)."""
    from jf_ray.config import parse_override, set_dotted

    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def config_data(args: argparse.Namespace, flags: Iterable[FieldFlag]) -> dict:
    """The settings as one mapping: ``--config`` YAML, then the flags given, then ``--set``."""
    from jf_ray.config import read_yaml, set_dotted
    from jf_ray.errors import UserInputError

    flags = tuple(flags)
    data = read_yaml(args.config) if args.config else {}
    for spec in flags:
        value = getattr(args, spec.dest)
        if value is not None:
            set_dotted(data, spec.field, value)
    apply_overrides(data, args.overrides)
    for spec in flags:
        if spec.required and _dotted_value(data, spec.field) is None:
            raise UserInputError(f"no {spec.field}: pass {spec.flag} (or set `{spec.field}` by --config or --set)")
    return data


def config_from_args(config_class, args: argparse.Namespace, flags: Iterable[FieldFlag]):
    """``config_class`` (a :class:`jf_ray.config.StageConfig`) from the layered settings."""
    return config_class.from_dict(config_data(args, flags))


def _dotted_value(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", dest="json_out", default=None, metavar="PATH|URI", help="write the report here (atomically)"
    )


def check_json_target(args: argparse.Namespace) -> None:
    """Fail before any work where the report could not be written."""
    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")


def write_report(args: argparse.Namespace, report: dict) -> None:
    from jf_ray.storage import write_json_atomic

    if args.json_out:
        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")

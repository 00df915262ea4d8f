"""Argument types and options shared by several ``jf-ray`` subcommands (light imports only)."""

from __future__ import annotations

import argparse

from jf_ray.decoding.registry import DECODER_NAMES, canonical


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
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
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

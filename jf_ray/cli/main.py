"""Entry point of ``jf-ray``.

Each stage owns one module in ``jf_ray.cli`` exposing ``register(subparsers)``; the module builds its parser
with light imports only (so ``--help`` is fast) and imports torch/ray inside the command it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from jf_ray.config import ConfigError
from jf_ray.errors import UserInputError

# Order here is the order shown by ``jf-ray --help``.
SUBCOMMANDS = [
    "jf_ray.cli.bench",
    "jf_ray.cli.collect",
    "jf_ray.cli.pack",
    "jf_ray.cli.train",
    "jf_ray.cli.serve",
    "jf_ray.cli.base",
    "jf_ray.cli.eval",
]


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (no usage dump) on bad arguments."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jf-ray", description="Jacobi Forcing on Ray: decode, collect, train, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (UserInputError, ConfigError) as exc:
        print(f"jf-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jf-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

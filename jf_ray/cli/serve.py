"""``jf-ray serve``: run the OpenAI-compatible Jacobi decoding service in the foreground.

Starts (or joins, with ``--address``) a Ray cluster, deploys the Serve app and waits; SIGINT or SIGTERM
deletes the app (and shuts Serve and Ray down when this command started them), so nothing keeps running.
"""

from __future__ import annotations

import argparse

from jf_ray.cli.common import add_address_option, decoder_name, join_or_start_ray, positive_int
from jf_ray.decoding.registry import describe


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint as an OpenAI-compatible API (Ray Serve, continuous batching)",
        description="Deploys jf_ray.serving:app on Ray Serve and runs until interrupted. Flags override the "
        "--config YAML (a ServeConfig); --set key=value overrides anything else (dotted keys).",
    )
    parser.add_argument("--model", default=None, help="checkpoint: local dir, file:// or s3:// URI")
    parser.add_argument("--config", default=None, help="ServeConfig YAML (e.g. the `args:` of serve_config.yaml)")
    parser.add_argument("--decoder", type=decoder_name, default=None, help=f"default decoder ({describe()})")
    parser.add_argument("--block-size", type=positive_int, default=None, help="Jacobi block size n")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--model-name", default=None, help="name clients pass as `model`")
    parser.add_argument("--max-batch-size", type=positive_int, default=None, help="requests per forward")
    parser.add_argument("--max-replicas", type=positive_int, default=None, help="autoscaling upper bound")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ServeConfig field, e.g. --set decode.num_blocks=3 (repeatable)",
    )
    add_address_option(parser)
    parser.add_argument("--ray-cpus", type=positive_int, default=None, help="CPUs of a locally started cluster")
    parser.set_defaults(func=run)


FLAG_FIELDS = {
    "model": "model",
    "decoder": "decode.decoder",
    "block_size": "decode.block_size",
    "host": "host",
    "port": "port",
    "model_name": "model_name",
    "max_batch_size": "max_batch_size",
    "max_replicas": "autoscaling.max_replicas",
    "api_key": "api_key",
}


def load_config(args: argparse.Namespace):
    """--config YAML, then the flags, then --set overrides (later wins)."""
    from jf_ray.config import parse_override, read_yaml, set_dotted
    from jf_ray.errors import UserInputError
    from jf_ray.serving.config import ServeConfig

    data = read_yaml(args.config) if args.config else {}
    for attr, key in FLAG_FIELDS.items():
        value = getattr(args, attr)
        if value is not None:
            set_dotted(data, key, value)
    for item in args.overrides:
        set_dotted(data, *parse_override(item))
    if "model" not in data:
        raise UserInputError("no model: pass --model URI (or a --config that sets `model`)")
    return ServeConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from jf_ray.modeling import local_model_path

    config = load_config(args)
    if "://" not in config.model or config.model.startswith("file://"):
        local_model_path(config.model)  # a missing local checkpoint is exit 2 now, not a dying replica later
    started_cluster = join_or_start_ray(args, num_cpus=args.ray_cpus)  # before ray is imported
    from ray import serve

    from jf_ray.serving.deployment import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        print(f"serving {config.served_model_name!r} (decoder {config.decode.decoder}) at {base}/v1", flush=True)
        print(
            f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{config.served_model_name}", "prompt": "def ", "max_tokens": 32}}\'',
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("shutting down", flush=True)
    finally:
        _teardown(config.app_name, started_cluster)
    return 0


def _teardown(app_name: str, started_cluster: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(app_name)
    finally:
        if started_cluster:
            serve.shutdown()
            ray.shutdown()
